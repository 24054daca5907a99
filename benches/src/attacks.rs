//! The attacks of issue #13 against the release `tunnel-server` in the
//! testbed, each on a freshly started server, with what the issue asks
//! of each: the server's peak memory, its open descriptors, how fast
//! `/healthz` answers during the attack (every 100 ms, 2 s deadline), and
//! whether a legitimate tunneled request (a 64-byte echo through DNAT and
//! the agent `edge-1`, every 500 ms, 5 s deadline) gets through.
//!
//! 1. QUIC handshake flood: Initials that never finish (`e2e::flood`),
//!    from 8 addresses on the router's cloud side (the internet, as the
//!    server sees it): spoofed (never answer a Retry), then answering
//!    every Retry from 16 addresses. A new agent registers during each.
//! 2. Client army: CONNECT streams through four agents to an edge server
//!    that writes without end, from clients that never read.
//! 3. Hostile HTTP/2 agent (`e2e::hostile`), a valid certificate, dialing
//!    through the NAT again and again: PUSH_PROMISE floods, header bombs.
//! 4. Stream exhaustion: idle CONNECT tunnels to one node up to the
//!    per-node limit, then one more CONNECT and a transparent connection.
//! 5. Descriptor exhaustion: the server under `prlimit --nofile=1024`,
//!    idle connections to the CONNECT port well past its client cap.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::flood::QuicFlood;
use e2e::hostile::{self, Hostile};
use e2e::netns::{NsTask, Proc, Topology, CLOUD_IP, EDGE_IP};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::Plan;
use crate::load;
use crate::probe::{self, open_fds, quantile_ms};
use crate::proc_stats::proc_status;
use crate::testbed::{self, Testbed, ADMIN, CONNECT_PORT, TUNNEL};

/// Nodes besides `edge-1` for the client army, each with its own address.
const MORE_NODES: [(&str, &str); 3] = [
    ("edge-2", "198.18.1.3"),
    ("edge-3", "198.18.1.4"),
    ("edge-4", "198.18.1.5"),
];
const HOSTILE: &str = "edge-evil";
const HOSTILE_IP: &str = "198.18.1.9";
const HEALTHZ_EVERY: Duration = Duration::from_millis(100);
const HEALTHZ_DEADLINE: Duration = Duration::from_secs(2);
const LEGIT_EVERY: Duration = Duration::from_millis(500);
const LEGIT_DEADLINE: Duration = Duration::from_secs(5);

/// One attack's figures.
#[derive(Serialize, Clone, Debug)]
pub struct AttackRow {
    pub attack: String,
    /// What the generator did and what the server answered.
    pub detail: String,
    pub secs: f64,
    pub server_rss_before_kib: u64,
    /// The larger of the sampled VmRSS and VmHWM (the server was started
    /// fresh for the attack).
    pub server_rss_peak_kib: u64,
    pub server_fds_before: u64,
    pub server_fds_peak: u64,
    pub healthz_probes: usize,
    /// Probes not answered 200 within 2 s.
    pub healthz_failures: usize,
    pub healthz_p50_ms: f64,
    pub healthz_p99_ms: f64,
    pub healthz_max_ms: f64,
    pub legit_total: usize,
    pub legit_ok: usize,
    pub legit_p50_ms: f64,
    pub legit_max_ms: f64,
}

pub fn run(bed: &mut Testbed, plan: &Plan) -> Result<Vec<AttackRow>> {
    // The agent is restarted with every server; a short drain keeps that
    // quick even if a stream of the last attack is still closing.
    if !bed.agent_extra.iter().any(|f| f == "--drain-grace") {
        bed.agent_extra
            .extend(["--drain-grace".to_owned(), "3".to_owned()]);
    }
    let pki = &bed.pki;
    for (node, ip) in MORE_NODES {
        bed.topo.add_edge_ip(ip);
        pki.issue_agent(node, &[ip.parse()?]);
    }
    pki.issue_agent(HOSTILE, &[HOSTILE_IP.parse()?]);
    // The chatty edge servers the army's clients reach on each node.
    let ips: Vec<IpAddr> = MORE_NODES
        .iter()
        .map(|(_, ip)| ip.parse().expect("IP"))
        .collect();
    let _servers: NsTask = bed.topo.edge.spawn_task(move || async move {
        for ip in ips {
            load::serve(ip, TUNNEL).await;
        }
    });
    for i in 0..16 {
        bed.topo
            .add_router_cloud_ip(&format!("198.18.0.{}", 10 + i));
    }

    let mut rows = vec![
        quic_flood(bed, plan, false)?,
        quic_flood(bed, plan, true)?,
        client_army(bed, plan)?,
        hostile_agent(bed, plan, HostileKind::PushPromise)?,
        hostile_agent(bed, plan, HostileKind::HeaderBomb)?,
        stream_exhaustion(bed, plan)?,
        fd_exhaustion(bed, plan)?,
    ];
    // Back to the standard server for whatever runs next.
    bed.restart_server(None, &[])?;
    for r in &mut rows {
        eprintln!("attack: {r:?}");
    }
    Ok(rows)
}

/// Restarts the server with `extra` flags and lets it settle.
fn fresh_server(bed: &mut Testbed, prefix: Option<&[&str]>, extra: &[&str]) -> Result<u32> {
    bed.restart_server(prefix, extra)?;
    std::thread::sleep(Duration::from_secs(1));
    Ok(bed.server.pid())
}

/// What the probes saw.
#[derive(Default)]
struct Probes {
    healthz: Vec<Duration>,
    healthz_failures: usize,
    legit: Vec<Duration>,
    legit_failures: usize,
}

async fn probe_loop(stop: &AtomicBool) -> Probes {
    let admin: SocketAddr = ADMIN.parse().expect("ADMIN");
    let echo = Testbed::addr(TUNNEL.echo);
    let healthz = async {
        let (mut ok, mut failed) = (Vec::new(), 0);
        while !stop.load(Ordering::Relaxed) {
            match probe::timed_get(admin, "/healthz", HEALTHZ_DEADLINE).await {
                Ok((200, _, took)) => ok.push(took),
                _ => failed += 1,
            }
            tokio::time::sleep(HEALTHZ_EVERY).await;
        }
        (ok, failed)
    };
    let legit = async {
        let (mut ok, mut failed) = (Vec::new(), 0);
        while !stop.load(Ordering::Relaxed) {
            match echo_once(echo, LEGIT_DEADLINE).await {
                Some(took) => ok.push(took),
                None => failed += 1,
            }
            tokio::time::sleep(LEGIT_EVERY).await;
        }
        (ok, failed)
    };
    let ((healthz, healthz_failures), (legit, legit_failures)) = tokio::join!(healthz, legit);
    Probes {
        healthz,
        healthz_failures,
        legit,
        legit_failures,
    }
}

/// A 64-byte echo on a new connection to `addr`; how long it took.
async fn echo_once(addr: SocketAddr, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let attempt = async {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(&[9u8; 64]).await?;
        let mut back = [0u8; 64];
        tcp.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back == [9u8; 64])
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(Ok(true)) => Some(start.elapsed()),
        _ => None,
    }
}

/// Runs `attack` while sampling the server's memory and descriptors and
/// probing `/healthz` and the tunnel; `attack` returns its detail line.
fn measure(
    topo: &Topology,
    server_pid: u32,
    name: &str,
    attack: impl FnOnce() -> Result<String>,
) -> Result<AttackRow> {
    let rss_before = proc_status(server_pid, "VmRSS:");
    let fds_before = open_fds(server_pid);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    eprintln!("attack: {name} ...");
    let (detail, (rss_peak, fds_peak), mut probes) = std::thread::scope(|s| {
        let stop = &stop;
        let sampler = s.spawn(move || {
            let (mut rss, mut fds) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                rss = rss.max(proc_status(server_pid, "VmRSS:"));
                fds = fds.max(open_fds(server_pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            (rss.max(proc_status(server_pid, "VmHWM:")), fds)
        });
        let prober = s.spawn(move || topo.cloud.block_on(|| probe_loop(stop)));
        let detail = attack();
        stop.store(true, Ordering::Relaxed);
        (
            detail,
            sampler.join().expect("sampler"),
            prober.join().expect("prober"),
        )
    });
    let detail = detail.with_context(|| format!("attack {name}"))?;
    probes.healthz.sort();
    probes.legit.sort();
    let row = AttackRow {
        attack: name.to_owned(),
        detail,
        secs: start.elapsed().as_secs_f64(),
        server_rss_before_kib: rss_before,
        server_rss_peak_kib: rss_peak,
        server_fds_before: fds_before,
        server_fds_peak: fds_peak,
        healthz_probes: probes.healthz.len() + probes.healthz_failures,
        healthz_failures: probes.healthz_failures,
        healthz_p50_ms: quantile_ms(&probes.healthz, 0.5),
        healthz_p99_ms: quantile_ms(&probes.healthz, 0.99),
        healthz_max_ms: quantile_ms(&probes.healthz, 1.0),
        legit_total: probes.legit.len() + probes.legit_failures,
        legit_ok: probes.legit.len(),
        legit_p50_ms: quantile_ms(&probes.legit, 0.5),
        legit_max_ms: quantile_ms(&probes.legit, 1.0),
    };
    eprintln!("attack: {row:?}");
    Ok(row)
}

/// The server's `/metrics` page (empty if it did not answer).
fn metrics(topo: &Topology) -> String {
    topo.cloud
        .block_on(|| probe::timed_get(ADMIN.parse().expect("ADMIN"), "/metrics", HEALTHZ_DEADLINE))
        .map(|(_, page, _)| page)
        .unwrap_or_default()
}

fn metric(page: &str, series: &str) -> f64 {
    probe::gauge(page, series).unwrap_or(0.0)
}

/// Waits (up to `within`) until the server lists `node`; how long it took.
fn wait_registered(topo: &Topology, node: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let want = format!("\"node\": \"{node}\"");
    while start.elapsed() < within {
        let agents = topo
            .cloud
            .block_on(|| {
                probe::timed_get(
                    ADMIN.parse().expect("ADMIN"),
                    "/v1/agents",
                    HEALTHZ_DEADLINE,
                )
            })
            .map(|(_, body, _)| body)
            .unwrap_or_default();
        if agents.contains(&want) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn extra_agent(bed: &Testbed, node: &str, ip: &str) -> Result<Proc> {
    testbed::spawn_agent_as(&bed.topo, &bed.pki, node, ip, "quic", &[])
}

fn quic_flood(bed: &mut Testbed, plan: &Plan, answer_retry: bool) -> Result<AttackRow> {
    let pid = fresh_server(bed, None, &[])?;
    let (n_sources, first) = if answer_retry { (16, 10) } else { (8, 10) };
    let sources: Vec<IpAddr> = (0..n_sources)
        .map(|i| IpAddr::from([198, 18, 0, first + i]))
        .collect();
    let flood = QuicFlood {
        target: SocketAddr::new(CLOUD_IP.parse()?, 8443),
        sources,
        rate: 6000,
        answer_retry,
    };
    let secs = plan.attack_secs;
    let name = if answer_retry {
        format!("QUIC handshake flood answering Retries, 6,000 Initials/s for {secs} s from 16 addresses")
    } else {
        format!("QUIC handshake flood, 6,000 Initials/s for {secs} s from 8 addresses (spoofed: no Retry answered)")
    };
    let bed = &*bed;
    measure(&bed.topo, pid, &name, || {
        let (counters, registered) = std::thread::scope(|s| {
            let flooding = s.spawn(|| {
                bed.topo.router.block_on(|| async {
                    let f = flood.start();
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    f.stop().await
                })
            });
            // A new agent registers in the middle of the flood.
            std::thread::sleep(Duration::from_secs(secs) / 3);
            let (node, ip) = MORE_NODES[0];
            let agent = extra_agent(bed, node, ip);
            let registered = agent
                .as_ref()
                .ok()
                .and_then(|_| wait_registered(&bed.topo, node, Duration::from_secs(secs * 2)));
            drop(agent);
            (flooding.join().expect("flood thread"), registered)
        });
        let page = metrics(&bed.topo);
        let limited = |limit: &str, action: &str| {
            metric(
                &page,
                &format!("edge_tunnel_handshakes_limited_total{{transport=\"quic\",limit=\"{limit}\",action=\"{action}\"}}"),
            )
        };
        Ok(format!(
            "{} Initials, {} Retries answered; server: {:.0} Retries sent, {:.0} dropped at the cap, \
             {:.0} per source, {:.0} admitted at the cap in place of a fuller source's oldest, \
             {:.0} handshake timeouts; new agent registered during the flood in {}",
            counters.attempts.load(Ordering::Relaxed),
            counters.retries_answered.load(Ordering::Relaxed),
            limited("retry_threshold", "retry") + limited("max_in_flight", "retry"),
            limited("max_in_flight", "ignore"),
            limited("per_source", "ignore"),
            limited("max_in_flight", "evict"),
            metric(
                &page,
                "edge_tunnel_handshake_failures_total{transport=\"quic\",reason=\"timeout\"}"
            ),
            registered.map_or("— (not within the deadline)".to_owned(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            )),
        ))
    })
}

/// A CONNECT through the server's CONNECT ingress to `target`; the
/// stream on 200, else the status (0: no answer).
async fn connect(target: &str, within: Duration) -> Result<TcpStream, u16> {
    let proxy = SocketAddr::new(CLOUD_IP.parse().expect("CLOUD_IP"), CONNECT_PORT);
    let attempt = async {
        let mut tcp = TcpStream::connect(proxy).await.map_err(|_| 0u16)?;
        let _ = tcp.set_nodelay(true);
        tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .map_err(|_| 0u16)?;
        // Byte by byte, so nothing after the head is consumed.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match tcp.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return Err(0),
            }
        }
        let head = String::from_utf8_lossy(&head);
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status == 200 {
            Ok(tcp)
        } else {
            Err(status)
        }
    };
    tokio::time::timeout(within, attempt)
        .await
        .unwrap_or(Err(0))
}

fn client_army(bed: &mut Testbed, plan: &Plan) -> Result<AttackRow> {
    let pid = fresh_server(bed, None, &[])?;
    let mut agents = Vec::new();
    for (node, ip) in MORE_NODES {
        agents.push(extra_agent(bed, node, ip)?);
    }
    for (node, _) in MORE_NODES {
        wait_registered(&bed.topo, node, Duration::from_secs(30))
            .with_context(|| format!("{node} did not register"))?;
    }
    let targets: Vec<String> = std::iter::once(EDGE_IP)
        .chain(MORE_NODES.iter().map(|(_, ip)| *ip))
        .map(|ip| format!("{ip}:{}", TUNNEL.source))
        .collect();
    let (streams, hold) = (plan.army_streams, plan.army_hold_secs);
    let name = format!(
        "Client army: {streams} CONNECT streams across 4 agents to an edge server that writes without end; the clients never read; held {hold} s"
    );
    let bed = &*bed;
    let stall_peak = AtomicU64::new(0);
    let row = measure(&bed.topo, pid, &name, || {
        let (opened, refused, open_secs) = bed.topo.cloud.block_on(|| async {
            // Opened 64 at a time, as fast as the server answers.
            let started = Instant::now();
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let workers: Vec<_> = (0..64)
                .map(|_| {
                    let (next, targets) = (next.clone(), targets.clone());
                    tokio::spawn(async move {
                        let (mut held, mut refused) = (Vec::new(), 0usize);
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= streams {
                                break (held, refused);
                            }
                            match connect(&targets[i % targets.len()], Duration::from_secs(15))
                                .await
                            {
                                Ok(tcp) => held.push(tcp),
                                Err(_) => refused += 1,
                            }
                        }
                    })
                })
                .collect();
            let (mut held, mut refused) = (Vec::with_capacity(streams), 0);
            for w in workers {
                if let Ok((h, r)) = w.await {
                    held.extend(h);
                    refused += r;
                }
            }
            let open_secs = started.elapsed().as_secs_f64();
            let opened = held.len();
            let until = Instant::now() + Duration::from_secs(hold);
            while Instant::now() < until {
                if let Ok((_, page, _)) =
                    probe::timed_get(ADMIN.parse().expect("ADMIN"), "/metrics", HEALTHZ_DEADLINE)
                        .await
                {
                    let lent = metric(&page, "edge_tunnel_stall_credit_bytes") as u64;
                    stall_peak.fetch_max(lent, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            drop(held);
            (opened, refused, open_secs)
        });
        let page = metrics(&bed.topo);
        Ok(format!(
            "{opened} streams open in {open_secs:.1} s, {refused} refused or not answered within 15 s; \
             stall credit lent at most {:.1} MiB; \
             {:.0} client stall resets; agents' peak RSS {} MiB",
            stall_peak.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0),
            metric(&page, "edge_tunnel_client_stall_resets_total"),
            agents
                .iter()
                .map(|a| format!("{:.0}", proc_status(a.pid(), "VmHWM:") as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" / "),
        ))
    });
    drop(agents);
    row
}

#[derive(Clone, Copy)]
enum HostileKind {
    PushPromise,
    HeaderBomb,
}

fn hostile_agent(bed: &mut Testbed, plan: &Plan, kind: HostileKind) -> Result<AttackRow> {
    let pid = fresh_server(bed, None, &[])?;
    let secs = plan.attack_secs;
    let name = match kind {
        HostileKind::PushPromise => format!(
            "Hostile HTTP/2 agent: 4 MB of PUSH_PROMISE on its control stream, reconnecting for {secs} s"
        ),
        HostileKind::HeaderBomb => format!(
            "Hostile HTTP/2 agent: a 4 MiB header block answering /control, reconnecting for {secs} s"
        ),
    };
    let bed = &*bed;
    let server = SocketAddr::new(CLOUD_IP.parse()?, 8443);
    measure(&bed.topo, pid, &name, || {
        let (rounds, dial_failures, registered) = bed.topo.edge.block_on(|| async {
            let until = Instant::now() + Duration::from_secs(secs);
            let (mut rounds, mut failures, mut registered) = (0u64, 0u64, 0u64);
            while Instant::now() < until {
                let Ok(mut evil) = Hostile::dial(&bed.pki, HOSTILE, server, "localhost").await
                else {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                match kind {
                    HostileKind::PushPromise => {
                        if evil.register(HOSTILE).await.is_ok() {
                            registered += 1;
                        }
                        hostile::push_promise_flood(&mut evil, 4_000_000).await;
                    }
                    HostileKind::HeaderBomb => {
                        hostile::header_bomb(&mut evil, 4 << 20, HOSTILE).await;
                    }
                }
                // The server ends the connection; give it 10 s.
                let _ = tokio::time::timeout(Duration::from_secs(10), evil.wait_closed()).await;
                rounds += 1;
            }
            (rounds, failures, registered)
        });
        let page = metrics(&bed.topo);
        Ok(format!(
            "{rounds} connections ({dial_failures} failed to dial; {registered} sent a Hello first); \
             server: {:.0} HTTP/2 protocol errors, {:.0} agents registered at the end",
            metric(
                &page,
                "edge_tunnel_agent_protocol_errors_total{kind=\"h2_protocol\"}"
            ),
            metric(&page, "edge_tunnel_agents_connected"),
        ))
    })
}

fn stream_exhaustion(bed: &mut Testbed, plan: &Plan) -> Result<AttackRow> {
    // The defaults (8,192 per node, 256 for the transparent path); quick
    // mode scales both down by 16.
    let (limit, reserve) = if plan.exhaust_streams >= 8_000 {
        (8_192u64, 256u64)
    } else {
        (512, 16)
    };
    let (limit_s, reserve_s) = (limit.to_string(), reserve.to_string());
    let pid = fresh_server(
        bed,
        None,
        &[
            "--max-streams-per-node",
            &limit_s,
            "--transparent-stream-reserve",
            &reserve_s,
        ],
    )?;
    let n = plan.exhaust_streams;
    let name = format!(
        "Stream exhaustion: {n} idle CONNECT tunnels to one node (limit {limit}, {reserve} kept for the transparent path), then one more CONNECT and a transparent connection"
    );
    let bed = &*bed;
    let target = format!("{EDGE_IP}:{}", TUNNEL.echo);
    measure(&bed.topo, pid, &name, || {
        let detail = bed.topo.cloud.block_on(|| async {
            let opened_at = Instant::now();
            let held = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
            let statuses = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let workers: Vec<_> = (0..128)
                .map(|_| {
                    let (held, statuses, next, target) =
                        (held.clone(), statuses.clone(), next.clone(), target.clone());
                    tokio::spawn(async move {
                        while next.fetch_add(1, Ordering::Relaxed) < n {
                            match connect(&target, Duration::from_secs(20)).await {
                                Ok(tcp) => held.lock().await.push(tcp),
                                Err(status) => {
                                    *statuses.lock().unwrap().entry(status).or_insert(0u64) += 1
                                }
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.await;
            }
            let open_secs = opened_at.elapsed().as_secs_f64();
            let opened = held.lock().await.len();
            let t = Instant::now();
            let one_more = connect(&target, Duration::from_secs(20)).await;
            let connect_ms = t.elapsed().as_secs_f64() * 1e3;
            let transparent = echo_once(Testbed::addr(TUNNEL.echo), LEGIT_DEADLINE).await;
            // Hold a moment longer under the probes.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let refused: Vec<String> = statuses
                .lock()
                .unwrap()
                .iter()
                .map(|(s, n)| format!("{n} × {}", if *s == 0 { "no answer".to_owned() } else { s.to_string() }))
                .collect();
            drop(held);
            format!(
                "{opened} tunnels open in {open_secs:.1} s, refused: {}; one more CONNECT: {} in {connect_ms:.1} ms; \
                 transparent connection: {}",
                if refused.is_empty() { "none".to_owned() } else { refused.join(", ") },
                match one_more {
                    Ok(_) => "200".to_owned(),
                    Err(0) => "no answer".to_owned(),
                    Err(s) => s.to_string(),
                },
                transparent.map_or("failed".to_owned(), |d| format!(
                    "echoed in {:.1} ms",
                    d.as_secs_f64() * 1e3
                )),
            )
        });
        let page = metrics(&bed.topo);
        Ok(format!(
            "{detail}; server: {:.0} dials refused at the node limit",
            metric(
                &page,
                "edge_tunnel_dial_failures_total{reason=\"node_stream_limit\"}"
            )
        ))
    })
}

fn fd_exhaustion(bed: &mut Testbed, plan: &Plan) -> Result<AttackRow> {
    let pid = fresh_server(bed, Some(&["prlimit", "--nofile=1024:1024"]), &[])?;
    let (n, secs) = (plan.fd_sockets, plan.attack_secs);
    let name = format!(
        "Descriptor exhaustion: server under prlimit --nofile=1024, {n} idle connections to the CONNECT port held {secs} s"
    );
    let bed = &*bed;
    let proxy = SocketAddr::new(CLOUD_IP.parse()?, CONNECT_PORT);
    let target = format!("{EDGE_IP}:{}", TUNNEL.echo);
    let mut back_after = None;
    let row = measure(&bed.topo, pid, &name, || {
        let opened = bed.topo.cloud.block_on(|| async {
            let mut idle = Vec::with_capacity(n);
            for _ in 0..n {
                // The kernel completes the handshake from the backlog
                // even when the server does not accept.
                if let Ok(Ok(tcp)) =
                    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(proxy)).await
                {
                    idle.push(tcp);
                }
            }
            let opened = idle.len();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            drop(idle);
            let released = Instant::now();
            while released.elapsed() < Duration::from_secs(30) {
                if connect(&target, Duration::from_secs(2)).await.is_ok() {
                    back_after = Some(released.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            opened
        });
        let page = metrics(&bed.topo);
        Ok(format!(
            "{opened} connections made; server: client cap {:.0}, {:.0} accepts waited at the cap, \
             {:.0} accept errors; a CONNECT served again {} after the idle connections closed",
            metric(&page, "edge_tunnel_client_connection_limit"),
            metric(&page, "edge_tunnel_client_connection_limit_hits_total"),
            ["connect", "transparent"]
                .iter()
                .map(|l| metric(
                    &page,
                    &format!("edge_tunnel_accept_errors_total{{listener=\"{l}\"}}")
                ))
                .sum::<f64>(),
            back_after.map_or("— (not within 30 s)".to_owned(), |d| format!(
                "{:.0} ms",
                d.as_secs_f64() * 1e3
            )),
        ))
    });
    row
}

/// The attacks' section of the results.
pub fn render(rows: &[AttackRow]) -> String {
    let mut out = String::from(
        "\n### Attacks (issue #13) against the release server\n\n\
         Each on a freshly started server. `/healthz` asked every 100 ms (2 s deadline); the \
         legitimate request is a 64 B echo through DNAT and the agent `edge-1`, every 500 ms \
         (5 s deadline). RSS peak: the larger of VmRSS sampled every 100 ms and VmHWM.\n\n\
         | attack | server RSS before → peak, MiB | open fds before → peak | /healthz p50 / p99 / max, ms (failed) | legitimate request ok, p50 / max ms |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.1} → {:.1} | {} → {} | {:.1} / {:.1} / {:.1} ({} of {}) | {} of {}, {:.1} / {:.1} |\n",
            r.attack,
            r.server_rss_before_kib as f64 / 1024.0,
            r.server_rss_peak_kib as f64 / 1024.0,
            r.server_fds_before,
            r.server_fds_peak,
            r.healthz_p50_ms,
            r.healthz_p99_ms,
            r.healthz_max_ms,
            r.healthz_failures,
            r.healthz_probes,
            r.legit_ok,
            r.legit_total,
            r.legit_p50_ms,
            r.legit_max_ms,
        ));
    }
    out.push_str("\nWhat each generator did and what the server counted:\n\n");
    for r in rows {
        out.push_str(&format!(
            "- **{}** ({:.0} s): {}.\n",
            r.attack, r.secs, r.detail
        ));
    }
    out
}
