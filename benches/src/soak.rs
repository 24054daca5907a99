//! The soak (issue #13): many short connections and a set of long ones
//! through the tunnel while the agent flaps, then a check that the
//! server's and the agent's descriptors, tokio tasks and memory come back
//! to where they were before.
//!
//! - Short connections: connect to the edge echo server through DNAT,
//!   one 64-byte request/response, close; `--soak-short` of them,
//!   [`CONCURRENCY`] in flight, each bounded by [`ATTEMPT_TIMEOUT`]; a
//!   worker whose connection failed pauses [`FAILURE_PAUSE`].
//! - Long connections: `--soak-long` of them, each sending 64 bytes and
//!   reading them back every second; one that breaks (the agent went
//!   away) is counted and dialed again after a pause, as a real client
//!   would.
//! - Flaps, spread over the short connections' progress, in the order
//!   [`Flap::ORDER`]: the agent killed (SIGKILL) and started again, a
//!   rolling update with surge (a new agent started next to the running
//!   one, which is stopped once the new one is registered), the agent
//!   stopped (SIGTERM, drains) and started again, and the path cut at the
//!   router (iptables) for longer than the idle timeout, so both ends give
//!   the connection up and the agent dials again. The last flap is always
//!   a cut, so the agent measured at the end has lived through load.
//! - Baseline: after a warm-up (short and long connections opened and
//!   closed once, so the allocators have grown their caches), the server
//!   and the agent idle. At the end, after the load stopped and the agent
//!   is back: polled until within the tolerances or [`SETTLE_DEADLINE`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use e2e::netns::{Proc, Topology};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::Plan;
use crate::probe::{self, Usage};
use crate::testbed::{self, Testbed, ADMIN, AGENT_ADMIN, TUNNEL};

/// Short connections in flight.
const CONCURRENCY: usize = 64;
/// One short connection's connect + request + response, at most.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a short-connection worker waits after a failure.
const FAILURE_PAUSE: Duration = Duration::from_millis(200);
/// How often each long connection exchanges 64 bytes.
const LONG_INTERVAL: Duration = Duration::from_secs(1);
/// Agent flags for the soak: the QUIC keep-alive and idle timeout are
/// shortened (the connection's idle timeout is the smaller of the two
/// ends') so a cut is noticed in seconds rather than 30 s, and the drain
/// on SIGTERM lasts 3 s rather than 30 s (the long connections never
/// finish on their own).
const AGENT_FLAGS: [&str; 6] = [
    "--keepalive",
    "2",
    "--idle-timeout",
    "8",
    "--drain-grace",
    "3",
];
const IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// Failures up to this long after the agent is registered again still
/// count as the outage's (the DNAT rule follows the registration).
const OUTAGE_GRACE: Duration = Duration::from_secs(2);
/// How long the end state may take to come back to the baseline.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// Tolerances: descriptors and tasks may differ by this many (a scrape
/// connection on its way out); resident memory may be this much higher.
const FD_SLACK: u64 = 2;
const TASK_SLACK: u64 = 2;
/// Freed memory is not all returned to the kernel (allocator caches and
/// fragmentation): 8 MiB over the warmed-up baseline is allowed. Spread
/// over the soak's 100,000 short connections a leak would have to stay
/// under ~84 bytes per connection to hide in it.
const RSS_SLACK_KIB: u64 = 8 * 1024;

/// How the agent goes away.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Flap {
    /// SIGKILL, then a new agent process: nothing tells the server.
    Kill,
    /// SIGTERM (Drain, then exit), then a new agent process.
    Term,
    /// A rolling update with surge: a new agent process started while the
    /// old one runs (it finds the instance lock held: a successor), the
    /// old one sent SIGTERM once the new one is registered. Counted from
    /// the new one's start until the old one has exited.
    Succeed,
    /// Every packet between edge and cloud dropped for longer than the
    /// idle timeout, then let through again; the agent process stays.
    Cut,
}

impl Flap {
    /// The order flaps take; the last of a run is always a cut.
    /// A succession second, so that the quick run's three flaps have one.
    const ORDER: [Flap; 4] = [Flap::Kill, Flap::Succeed, Flap::Term, Flap::Cut];

    fn schedule(n: usize) -> Vec<Flap> {
        let mut flaps: Vec<Flap> = (0..n).map(|i| Flap::ORDER[i % Flap::ORDER.len()]).collect();
        if let Some(last) = flaps.last_mut() {
            *last = Flap::Cut;
        }
        flaps
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct FlapReport {
    pub kind: Flap,
    /// From the flap until the server had the agent registered again.
    pub outage_secs: f64,
    /// What it cost the short connections.
    pub cost: FlapCost,
}

/// The short connections one flap failed, apart by when they began: the
/// totals count both as the outage's, but a failure begun after the
/// agent was back is the tunnel's, not the outage's, if the grace hides
/// it.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct FlapCost {
    /// In flight when the agent went, or begun while it was away.
    pub while_away: usize,
    /// Begun within [`OUTAGE_GRACE`] after it was back.
    pub after_back: usize,
    /// Of those, the longest attempt, and the latest start (seconds after
    /// the agent was back); 0 when there were none.
    pub after_back_longest_secs: f64,
    pub after_back_last_began_secs: f64,
}

impl FlapCost {
    /// The cost of the outage (`gone`, `back`) among `failures` (start,
    /// end, ...). A failure still in flight when the next flap came
    /// (`next_gone`) is that flap's, not this one's aftermath: in a quick
    /// run the next flap can come within the grace.
    fn of(
        gone: Instant,
        back: Instant,
        next_gone: Option<Instant>,
        failures: &[(Instant, Instant, Stage, u16)],
    ) -> FlapCost {
        let mut cost = FlapCost::default();
        for &(began, ended, ..) in failures {
            if began < back && ended >= gone {
                cost.while_away += 1;
            } else if began >= back
                && began < back + OUTAGE_GRACE
                && next_gone.is_none_or(|next| ended < next)
            {
                cost.after_back += 1;
                cost.after_back_longest_secs = cost
                    .after_back_longest_secs
                    .max((ended - began).as_secs_f64());
                cost.after_back_last_began_secs = cost
                    .after_back_last_began_secs
                    .max((began - back).as_secs_f64());
            }
        }
        cost
    }
}

/// A short connection that failed while the agent was registered.
#[derive(Serialize, Clone, Debug)]
pub struct ShortFailure {
    /// When it began: seconds since the soak began.
    pub since_start: f64,
    /// Seconds since the agent was last back (-1: before any flap).
    pub since_back: f64,
    /// How long the attempt took.
    pub secs: f64,
    /// Where it stopped ([`Stage`]).
    pub stage: &'static str,
    /// Its local port, to find it in a capture or a conntrack listing.
    pub port: u16,
}

/// How far a short connection got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// `connect()`: the SYN went unanswered (or was refused).
    Connect,
    /// Writing the request.
    Request,
    /// Waiting for the response: connected, but the tunnel did not
    /// deliver (or the connection was reset).
    Response,
    /// The response was not the request echoed.
    Mismatch,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Request => "request",
            Stage::Response => "response",
            Stage::Mismatch => "wrong answer",
        }
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct SoakReport {
    pub short_total: usize,
    pub short_ok: usize,
    /// Failed while the agent was away (or up to 2 s after it was back).
    pub short_failed_in_outage: usize,
    /// Failed while the agent was registered: these should be none.
    pub short_failed_otherwise: usize,
    /// The first 32 of those.
    pub short_failures_otherwise: Vec<ShortFailure>,
    /// Where every failed short connection stopped, outage or not:
    /// (stage, count).
    pub short_failure_stages: Vec<(&'static str, usize)>,
    pub short_secs: f64,
    pub long_total: usize,
    /// Long connections that broke (the agent went away under them).
    pub long_breaks: u64,
    /// Breaks while the agent was registered: these should be none.
    pub long_breaks_otherwise: u64,
    /// Dials of long connections (first ones and after a break) that failed.
    pub long_dial_failures: u64,
    pub long_round_trips: u64,
    /// Long connections open when the load stopped.
    pub long_open_at_end: u64,
    pub flaps: Vec<FlapReport>,
    /// Server, agent.
    pub baseline: [Usage; 2],
    pub peak: [Usage; 2],
    pub after: [Usage; 2],
    /// From the end of the load until within the tolerances (or the deadline).
    pub settle_secs: f64,
    pub fds_back: bool,
    pub tasks_back: bool,
    pub rss_back: bool,
    pub total_secs: f64,
}

impl SoakReport {
    /// Whether the end state came back within the tolerances.
    pub fn passed(&self) -> bool {
        self.fds_back
            && self.tasks_back
            && self.rss_back
            && self.short_failed_otherwise == 0
            && self.long_breaks_otherwise == 0
    }
}

/// What the load generator and the flapper share.
#[derive(Default)]
struct Shared {
    short_done: AtomicUsize,
    short_finished: AtomicBool,
    stop_long: AtomicBool,
    long_breaks: AtomicU64,
    long_dial_failures: AtomicU64,
    long_round_trips: AtomicU64,
    long_open: AtomicU64,
    /// When each long connection broke.
    long_break_times: Mutex<Vec<Instant>>,
    /// (start, end) of every failed short connection.
    short_failures: Mutex<Vec<(Instant, Instant, Stage, u16)>>,
    /// (agent gone, agent registered again) of every flap.
    outages: Mutex<Vec<(Instant, Instant)>>,
    /// The agent process to sample (changes when it is restarted).
    agent_pid: AtomicU32,
}

pub fn run(bed: &mut Testbed, plan: &Plan) -> Result<SoakReport> {
    let started = Instant::now();
    let echo = Testbed::addr(TUNNEL.echo);
    // The testbed widened the ephemeral port range for this many
    // connections (`Testbed::start`).
    bed.agent_extra = AGENT_FLAGS.iter().map(|s| s.to_string()).collect();
    let lock = bed.topo.dir.join("agent.lock");
    bed.agent_extra
        .extend(["--instance-lock".to_owned(), lock.display().to_string()]);
    bed.restart_agent("quic")?;

    // Warm-up, then the baseline: the long connections opened, one
    // exchange each and held while a tenth of the short ones run, then
    // all closed.
    testbed::in_cloud(&bed.topo, || async {
        let longs: Vec<_> = (0..plan.soak_long)
            .map(|_| {
                tokio::spawn(async move {
                    let mut tcp = TcpStream::connect(echo).await.ok()?;
                    tcp.write_all(&[3u8; 64]).await.ok()?;
                    let mut back = [0u8; 64];
                    tcp.read_exact(&mut back).await.ok()?;
                    Some(tcp)
                })
            })
            .collect();
        let mut held = Vec::new();
        for l in longs {
            held.push(l.await);
        }
        let _ = crate::load::conn_rate(echo, (plan.soak_short / 10).max(CONCURRENCY), CONCURRENCY)
            .await;
        drop(held);
    });
    std::thread::sleep(Duration::from_secs(2));
    let baseline = sample(&bed.topo, bed.server.pid(), bed.agent.pid());
    eprintln!(
        "soak: baseline server {:?}, agent {:?}",
        baseline[0], baseline[1]
    );

    let shared = Arc::new(Shared::default());
    shared.agent_pid.store(bed.agent.pid(), Ordering::Relaxed);
    let flaps = Flap::schedule(plan.soak_flaps);
    let server_pid = bed.server.pid();
    let (flap_reports, short_secs, peak) = {
        let topo = &bed.topo;
        let pki = &bed.pki;
        let agent_extra = &bed.agent_extra;
        let agent = &mut bed.agent;
        let shared = &shared;
        let (load_result, flap_result, peak_seen) = std::thread::scope(|s| {
            let load = s.spawn(move || {
                testbed::in_cloud(topo, || {
                    load(echo, plan.soak_short, plan.soak_long, shared.clone())
                })
            });
            let sampler = s.spawn(move || {
                let mut peak = baseline;
                while !shared.stop_long.load(Ordering::Relaxed) {
                    let agent_pid = shared.agent_pid.load(Ordering::Relaxed);
                    peak = peak.zip_max(sample(topo, server_pid, agent_pid));
                    std::thread::sleep(Duration::from_millis(500));
                }
                peak
            });
            let flapper = (|| -> Result<Vec<FlapReport>> {
                let mut reports = Vec::new();
                for (i, &kind) in flaps.iter().enumerate() {
                    let at = plan.soak_short * (i + 1) / (flaps.len() + 1);
                    while shared.short_done.load(Ordering::Relaxed) < at
                        && !shared.short_finished.load(Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let (gone, back) = flap(topo, pki, agent, agent_extra, kind)?;
                    shared.agent_pid.store(agent.pid(), Ordering::Relaxed);
                    shared.outages.lock().unwrap().push((gone, back));
                    eprintln!(
                        "soak: flap {kind:?} at {} short connections: agent back after {:.1} s",
                        shared.short_done.load(Ordering::Relaxed),
                        (back - gone).as_secs_f64()
                    );
                    reports.push(FlapReport {
                        kind,
                        outage_secs: (back - gone).as_secs_f64(),
                        // Filled in once the load is over.
                        cost: FlapCost::default(),
                    });
                }
                Ok(reports)
            })();
            // The long connections stay until the short ones are done and
            // the agent is back from its last flap.
            while !shared.short_finished.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            shared.stop_long.store(true, Ordering::Relaxed);
            let load_result = load.join().expect("load thread");
            let peak_seen = sampler.join().expect("sampler thread");
            (load_result, flapper, peak_seen)
        });
        match flap_result {
            Ok(reports) => (reports, load_result, baseline.zip_max(peak_seen)),
            Err(e) => bail!("soak: a flap failed: {e:#}"),
        }
    };

    // Settle: poll until back within the tolerances, or the deadline.
    let load_end = Instant::now();
    let (after, settle_secs) = loop {
        let now = sample(&bed.topo, bed.server.pid(), bed.agent.pid());
        let elapsed = load_end.elapsed();
        if within(&baseline, &now) == (true, true, true) || elapsed > SETTLE_DEADLINE {
            break (now, elapsed.as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let (fds_back, tasks_back, rss_back) = within(&baseline, &after);

    let outages = shared.outages.lock().unwrap().clone();
    let in_outage = |from: Instant, to: Instant| {
        outages
            .iter()
            .any(|&(gone, back)| from <= back + OUTAGE_GRACE && to >= gone)
    };
    let failures = shared.short_failures.lock().unwrap().clone();
    let mut flap_reports = flap_reports;
    for (i, (report, &(gone, back))) in flap_reports.iter_mut().zip(&outages).enumerate() {
        let next_gone = outages.get(i + 1).map(|&(next, _)| next);
        report.cost = FlapCost::of(gone, back, next_gone, &failures);
    }
    let failed_in_outage = failures
        .iter()
        .filter(|&&(a, b, ..)| in_outage(a, b))
        .count();
    let mut stages: Vec<(&'static str, usize)> = Vec::new();
    for &(.., stage, _) in &failures {
        match stages.iter_mut().find(|(name, _)| *name == stage.name()) {
            Some((_, n)) => *n += 1,
            None => stages.push((stage.name(), 1)),
        }
    }
    // Where the other failures fell: seconds since the soak's start and
    // since the agent was last back, how long the attempt took and how far
    // it got.
    let failures_otherwise: Vec<ShortFailure> = failures
        .iter()
        .filter(|&&(a, b, ..)| !in_outage(a, b))
        .take(32)
        .map(|&(a, b, stage, port)| {
            let since_back = outages
                .iter()
                .filter(|&&(_, back)| back <= a)
                .map(|&(_, back)| (a - back).as_secs_f64())
                .fold(-1.0, |m: f64, x| if m < 0.0 { x } else { m.min(x) });
            ShortFailure {
                since_start: (a - started).as_secs_f64(),
                since_back,
                secs: (b - a).as_secs_f64(),
                stage: stage.name(),
                port,
            }
        })
        .collect();
    let breaks = shared.long_break_times.lock().unwrap().clone();
    // A long connection notices a break at its next exchange (up to a
    // second later) or when its read times out (10 s later).
    let breaks_otherwise = breaks
        .iter()
        .filter(|&&t| {
            let from = t.checked_sub(ATTEMPT_TIMEOUT + LONG_INTERVAL).unwrap_or(t);
            !in_outage(from, t)
        })
        .count() as u64;
    let report = SoakReport {
        short_total: plan.soak_short,
        short_ok: plan.soak_short - failures.len(),
        short_failed_in_outage: failed_in_outage,
        short_failed_otherwise: failures.len() - failed_in_outage,
        short_failures_otherwise: failures_otherwise,
        short_failure_stages: stages,
        short_secs,
        long_total: plan.soak_long,
        long_breaks: shared.long_breaks.load(Ordering::Relaxed),
        long_breaks_otherwise: breaks_otherwise,
        long_dial_failures: shared.long_dial_failures.load(Ordering::Relaxed),
        long_round_trips: shared.long_round_trips.load(Ordering::Relaxed),
        long_open_at_end: shared.long_open.load(Ordering::Relaxed),
        flaps: flap_reports,
        baseline,
        peak,
        after,
        settle_secs,
        fds_back,
        tasks_back,
        rss_back,
        total_secs: started.elapsed().as_secs_f64(),
    };
    eprintln!("soak: {report:?}");
    Ok(report)
}

trait ZipMax {
    fn zip_max(self, other: Self) -> Self;
}

impl ZipMax for [Usage; 2] {
    fn zip_max(self, other: Self) -> Self {
        [self[0].max(other[0]), self[1].max(other[1])]
    }
}

/// Whether `now` is back at `baseline` for (fds, tasks, RSS), both processes.
fn within(baseline: &[Usage; 2], now: &[Usage; 2]) -> (bool, bool, bool) {
    let close = |a: u64, b: u64, slack: u64| a.abs_diff(b) <= slack;
    let fds = (0..2).all(|i| close(baseline[i].fds, now[i].fds, FD_SLACK));
    let tasks = (0..2).all(|i| close(baseline[i].tasks, now[i].tasks, TASK_SLACK));
    let rss = (0..2).all(|i| now[i].rss_kib <= baseline[i].rss_kib + RSS_SLACK_KIB);
    (fds, tasks, rss)
}

/// Server and agent usage now. Tasks are scraped first, then `/proc` is
/// read a moment later, when the scrape's connection is gone.
fn sample(topo: &Topology, server_pid: u32, agent_pid: u32) -> [Usage; 2] {
    let server_tasks = testbed::in_cloud(topo, || {
        probe::tasks(ADMIN.parse().expect("ADMIN"), "edge_tunnel_tasks")
    });
    let agent_tasks = topo.edge.block_on(|| {
        probe::tasks(
            AGENT_ADMIN.parse().expect("AGENT_ADMIN"),
            "edge_tunnel_agent_tasks",
        )
    });
    std::thread::sleep(Duration::from_millis(50));
    [
        Usage::of(server_pid, server_tasks.unwrap_or(0)),
        Usage::of(agent_pid, agent_tasks.unwrap_or(0)),
    ]
}

/// The server's count of registrations so far (both transports).
fn registrations(topo: &Topology) -> f64 {
    let page = testbed::in_cloud(topo, || {
        probe::timed_get(
            ADMIN.parse().expect("ADMIN"),
            "/metrics",
            Duration::from_secs(2),
        )
    })
    .map(|(_, page, _)| page)
    .unwrap_or_default();
    ["quic", "h2"]
        .iter()
        .filter_map(|t| {
            probe::gauge(
                &page,
                &format!("edge_tunnel_registrations_total{{transport=\"{t}\"}}"),
            )
        })
        .sum()
}

/// Makes the agent go away as `kind` says and waits until it is registered
/// again. Returns when it went and when it was back.
fn flap(
    topo: &Topology,
    pki: &e2e::Pki,
    agent: &mut Proc,
    agent_extra: &[String],
    kind: Flap,
) -> Result<(Instant, Instant)> {
    let before = registrations(topo);
    let gone = Instant::now();
    let registered = |agent: &Proc| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while registrations(topo) <= before {
            if Instant::now() > deadline {
                bail!(
                    "the agent did not register again within 60 s of a {kind:?}: {}",
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    match kind {
        Flap::Kill => {
            agent.kill();
            *agent = testbed::spawn_agent(topo, pki, "quic", agent_extra)?;
        }
        Flap::Term => {
            agent.terminate();
            *agent = testbed::spawn_agent(topo, pki, "quic", agent_extra)?;
        }
        Flap::Succeed => {
            // The old process keeps writing its log where it is.
            let log = topo.dir.join("agent-edge-1-quic.log");
            let _ = std::fs::rename(&log, topo.dir.join("agent-edge-1-quic.succeeded.log"));
            let new = testbed::spawn_agent(topo, pki, "quic", agent_extra)?;
            registered(&new)?;
            let mut old = std::mem::replace(agent, new);
            old.terminate();
        }
        Flap::Cut => {
            topo.cut_link();
            std::thread::sleep(IDLE_TIMEOUT + Duration::from_secs(2));
            topo.restore_link();
        }
    }
    registered(agent)?;
    Ok((gone, Instant::now()))
}

/// The short and the long connections; returns how long the short ones took.
async fn load(echo: SocketAddr, short: usize, long: usize, shared: Arc<Shared>) -> f64 {
    let longs: Vec<_> = (0..long)
        .map(|i| {
            // Spread the exchanges over the interval.
            let offset = LONG_INTERVAL.mul_f64(i as f64 / long as f64);
            tokio::spawn(long_conn(echo, offset, shared.clone()))
        })
        .collect();
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, shared) = (next.clone(), shared.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < short {
                    let t0 = Instant::now();
                    let result = short_conn(echo).await;
                    if let Err((stage, port)) = result {
                        shared.short_failures.lock().unwrap().push((
                            t0,
                            Instant::now(),
                            stage,
                            port,
                        ));
                    }
                    shared.short_done.fetch_add(1, Ordering::Relaxed);
                    if result.is_err() {
                        // A client pauses before it tries again; without
                        // this, connections refused at once (the agent
                        // draining) would use up the count in a moment.
                        tokio::time::sleep(FAILURE_PAUSE).await;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let secs = start.elapsed().as_secs_f64();
    shared.short_finished.store(true, Ordering::Relaxed);
    for l in longs {
        let _ = l.await;
    }
    secs
}

/// One short connection; where it stopped and its local port (0 before
/// it had one) if it failed.
async fn short_conn(echo: SocketAddr) -> Result<(), (Stage, u16)> {
    let mut stage = Stage::Connect;
    let mut port = 0;
    let attempt = async {
        let mut tcp = TcpStream::connect(echo).await?;
        port = tcp.local_addr().map_or(0, |a| a.port());
        stage = Stage::Request;
        tcp.set_nodelay(true)?;
        tcp.write_all(&[1u8; 64]).await?;
        stage = Stage::Response;
        let mut back = [0u8; 64];
        tcp.read_exact(&mut back).await?;
        if back != [1u8; 64] {
            stage = Stage::Mismatch;
            return Ok(false);
        }
        Ok::<_, std::io::Error>(true)
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
        Ok(Ok(true)) => Ok(()),
        _ => Err((stage, port)),
    }
}

/// One long connection: dialed, then 64 bytes each way every second until
/// the load stops; dialed again after a break.
async fn long_conn(echo: SocketAddr, offset: Duration, shared: Arc<Shared>) {
    tokio::time::sleep(offset).await;
    while !shared.stop_long.load(Ordering::Relaxed) {
        let dialed = tokio::time::timeout(ATTEMPT_TIMEOUT, TcpStream::connect(echo)).await;
        let Ok(Ok(mut tcp)) = dialed else {
            shared.long_dial_failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        shared.long_open.fetch_add(1, Ordering::Relaxed);
        let mut broke = false;
        while !shared.stop_long.load(Ordering::Relaxed) {
            let exchange = async {
                tcp.write_all(&[2u8; 64]).await?;
                let mut back = [0u8; 64];
                tcp.read_exact(&mut back).await?;
                Ok::<_, std::io::Error>(back == [2u8; 64])
            };
            if !matches!(
                tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await,
                Ok(Ok(true))
            ) {
                broke = true;
                break;
            }
            shared.long_round_trips.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(LONG_INTERVAL).await;
        }
        if broke {
            shared.long_open.fetch_sub(1, Ordering::Relaxed);
            shared.long_breaks.fetch_add(1, Ordering::Relaxed);
            shared.long_break_times.lock().unwrap().push(Instant::now());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The soak's section of the results.
pub fn render(r: &SoakReport) -> String {
    let flaps: Vec<String> = r
        .flaps
        .iter()
        .map(|f| format!("{:?} ({:.1} s)", f.kind, f.outage_secs).to_lowercase())
        .collect();
    let mut out = format!(
        "\n### Soak: {} short connections and {} long ones while the agent flaps\n\n\
         Flaps (agent away until registered again): {}. Short connections: connect through DNAT, \
         64 B request/response, close, {CONCURRENCY} in flight (a worker pauses 0.2 s after a failure); long connections: 64 B each way \
         every second, dialed again when they break. Agent keep-alive 2 s, idle timeout 8 s.\n\n\
         | measure | value |\n|---|---:|\n\
         | short connections ok / failed while the agent was away / failed otherwise | {} / {} / {} |\n\
         | failed short connections by where they stopped | {} |\n\
         | short connections' duration | {:.1} s ({:.0} conn/s) |\n\
         | long connections: breaks (all / while the agent was registered), failed dials, round trips | {} / {}, {}, {} |\n\
         | long connections open when the load stopped | {} of {} |\n\
         | back at the baseline after | {:.1} s (deadline {} s) |\n\n",
        r.short_total,
        r.long_total,
        flaps.join(", "),
        r.short_ok,
        r.short_failed_in_outage,
        r.short_failed_otherwise,
        stages(&r.short_failure_stages),
        r.short_secs,
        r.short_total as f64 / r.short_secs.max(1e-9),
        r.long_breaks,
        r.long_breaks_otherwise,
        r.long_dial_failures,
        r.long_round_trips,
        r.long_open_at_end,
        r.long_total,
        r.settle_secs,
        SETTLE_DEADLINE.as_secs(),
    );
    out.push_str(&format!(
        "| flap | agent away, s | failed: in flight or begun while away | begun within {} s of the return | of those: longest, s / last began, s after the return |\n\
         |---|---:|---:|---:|---:|\n",
        OUTAGE_GRACE.as_secs()
    ));
    for f in &r.flaps {
        let c = &f.cost;
        out.push_str(&format!(
            "| {} | {:.1} | {} | {} | {:.1} / {:.2} |\n",
            format!("{:?}", f.kind).to_lowercase(),
            f.outage_secs,
            c.while_away,
            c.after_back,
            c.after_back_longest_secs,
            c.after_back_last_began_secs,
        ));
    }
    out.push('\n');
    out.push_str(
        "| process | measure | baseline | peak | after | tolerance | back |\n|---|---|---:|---:|---:|---|---|\n",
    );
    for (i, who) in ["server", "agent"].iter().enumerate() {
        let (b, p, a) = (r.baseline[i], r.peak[i], r.after[i]);
        out.push_str(&format!(
            "| {who} | open fds | {} | {} | {} | ± {FD_SLACK} | {} |\n\
             | {who} | tokio tasks | {} | {} | {} | ± {TASK_SLACK} | {} |\n\
             | {who} | RSS, KiB | {} | {} | {} | + {RSS_SLACK_KIB} | {} |\n",
            b.fds,
            p.fds,
            a.fds,
            yes(b.fds.abs_diff(a.fds) <= FD_SLACK),
            b.tasks,
            p.tasks,
            a.tasks,
            yes(b.tasks.abs_diff(a.tasks) <= TASK_SLACK),
            b.rss_kib,
            p.rss_kib,
            a.rss_kib,
            yes(a.rss_kib <= b.rss_kib + RSS_SLACK_KIB),
        ));
    }
    if !r.short_failures_otherwise.is_empty() {
        out.push_str(
            "\nShort connections that failed while the agent was registered (the first 32):\n\n\
             | began, s into the soak | s after the agent was back | took, s | stopped at | local port |\n\
             |---:|---:|---:|---|---:|\n",
        );
        for f in &r.short_failures_otherwise {
            out.push_str(&format!(
                "| {:.2} | {:.2} | {:.2} | {} | {} |\n",
                f.since_start, f.since_back, f.secs, f.stage, f.port
            ));
        }
    }
    out.push_str(
        "\nThe agent's baseline is the first agent process's; \"after\" is the process started at \
         the last restart, which then lived through the rest of the load and the final cut. Peaks \
         are sampled every 0.5 s.\n",
    );
    out
}

/// `connect 1200, response 45`, or `none`.
fn stages(counts: &[(&'static str, usize)]) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(stage, n)| format!("{stage} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "**no**"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_flap_in_a_full_run_and_the_last_a_cut() {
        use Flap::*;
        assert_eq!(Flap::schedule(4), [Kill, Succeed, Term, Cut]);
        assert_eq!(Flap::schedule(3), [Kill, Succeed, Cut]);
        assert_eq!(Flap::schedule(2), [Kill, Cut]);
        assert_eq!(Flap::schedule(6), [Kill, Succeed, Term, Cut, Kill, Cut]);
    }

    fn report() -> SoakReport {
        let usage = Usage {
            rss_kib: 20_000,
            fds: 16,
            tasks: 10,
        };
        SoakReport {
            short_total: 100,
            short_ok: 97,
            short_failed_in_outage: 2,
            short_failed_otherwise: 1,
            short_failures_otherwise: vec![ShortFailure {
                since_start: 45.32,
                since_back: 2.01,
                secs: 10.0,
                stage: Stage::Response.name(),
                port: 41_002,
            }],
            short_failure_stages: vec![("connect", 2), ("response", 1)],
            short_secs: 10.0,
            long_total: 10,
            long_breaks: 10,
            long_breaks_otherwise: 0,
            long_dial_failures: 0,
            long_round_trips: 100,
            long_open_at_end: 10,
            flaps: vec![FlapReport {
                kind: Flap::Kill,
                outage_secs: 0.1,
                cost: FlapCost {
                    while_away: 2,
                    after_back: 3,
                    after_back_longest_secs: 10.0,
                    after_back_last_began_secs: 1.87,
                },
            }],
            baseline: [usage, usage],
            peak: [usage, usage],
            after: [usage, usage],
            settle_secs: 0.5,
            fds_back: true,
            tasks_back: true,
            rss_back: true,
            total_secs: 20.0,
        }
    }

    #[test]
    fn failed_short_connections_say_where_they_stopped() {
        let r = report();
        assert!(!r.passed());
        let text = render(&r);
        assert!(
            text.contains(
                "| failed short connections by where they stopped | connect 2, response 1 |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| 45.32 | 2.01 | 10.00 | response | 41002 |"),
            "{text}"
        );
    }

    #[test]
    fn a_flap_s_failures_are_told_apart_by_when_they_began() {
        let gone = Instant::now();
        let at = |s: f64| gone + Duration::from_secs_f64(s);
        let back = at(1.0);
        let failures = [
            // In flight when the agent went.
            (
                gone - Duration::from_millis(300),
                at(0.2),
                Stage::Response,
                1,
            ),
            // Begun while it was away.
            (at(0.5), at(0.6), Stage::Connect, 2),
            // Begun after it was back, within the grace.
            (at(1.1), at(11.1), Stage::Response, 3),
            (at(2.9), at(3.0), Stage::Connect, 4),
            // After the grace: the report's "otherwise", not this flap's.
            (at(3.5), at(13.5), Stage::Response, 5),
            // Over before the agent went.
            (
                gone - Duration::from_secs(2),
                gone - Duration::from_secs(1),
                Stage::Response,
                6,
            ),
        ];
        // The longest attempt and the latest start after the return, in ms.
        let after = |c: &FlapCost| {
            (
                (c.after_back_longest_secs * 1e3).round(),
                (c.after_back_last_began_secs * 1e3).round(),
            )
        };
        let cost = FlapCost::of(gone, back, None, &failures);
        assert_eq!((cost.while_away, cost.after_back), (2, 2));
        assert_eq!(after(&cost), (10_000.0, 1_900.0), "{cost:?}");
        // The next flap came at 3.05 s: the attempt begun at 1.1 s and
        // still in flight then is that flap's; the one over at 3.0 s is
        // still this one's.
        let next = FlapCost::of(gone, back, Some(at(3.05)), &failures);
        assert_eq!((next.while_away, next.after_back), (2, 1));
        assert_eq!(after(&next), (100.0, 1_900.0), "{next:?}");
        let mut r = report();
        r.flaps[0].cost = cost;
        let text = render(&r);
        assert!(
            text.contains("| kill | 0.1 | 2 | 2 | 10.0 / 1.90 |"),
            "{text}"
        );
    }

    #[test]
    fn a_clean_soak_lists_no_failures() {
        let mut r = report();
        r.short_failed_otherwise = 0;
        r.short_failures_otherwise.clear();
        r.short_failure_stages.clear();
        assert!(r.passed());
        let text = render(&r);
        assert!(text.contains("stopped | none |"), "{text}");
        assert!(!text.contains("local port"), "{text}");
    }
}
