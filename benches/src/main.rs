//! Benchmark runner: every workload through the tunnel and over a direct
//! routed TCP path, interleaved in the same run, on the network-namespace
//! topology of the end-to-end tests (cloud / router / edge). The tunnel
//! runs as the real release binaries; the direct path is the same edge
//! servers on other ports that the router lets through.
//!
//! ```text
//! cargo run --release -p benches -- [--quick] [--json PATH] [--results PATH] [--only LIST]
//! ```
//!
//! Needs root (network namespaces) and `cargo build --release --bins`.
//!
//! - [`cli`]: flags, the [`cli::Plan`] they select, the workload names.
//! - [`testbed`]: the topology with the tunnel, the edge servers and the
//!   reference forwarders ([`forwarder`]), and how a client reaches each path.
//! - [`load`]: the load generators and the edge servers they talk to.
//! - One module per workload: [`bulk`], [`ping_pong`], [`conn_rate`],
//!   [`echo`], [`transports`], [`fleet_run`] (which drives `edge-fleet`).
//! - [`soak`]: short and long connections while the agent flaps, and
//!   whether descriptors, tasks and memory come back; [`attacks`]: the
//!   attacks of issue #13 against the release server, with its memory,
//!   descriptors and `/healthz` answer times under each.
//! - [`proc_stats`]: CPU, memory and context switches from `/proc`;
//!   [`socket_mem`]: each tunnel process's kernel socket memory (cgroup);
//!   [`probe`]: admin endpoints with deadlines, gauges, descriptors.
//! - [`report`]: the rows, the Markdown table and the JSON.

mod attacks;
mod bulk;
mod cli;
mod conn_rate;
mod echo;
mod fleet_run;
mod forwarder;
mod load;
mod peers;
mod ping_pong;
mod probe;
mod proc_stats;
mod report;
mod soak;
mod socket_mem;
mod testbed;
mod transports;

use std::time::Duration;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Workload};
use report::{Memory, Report};
use testbed::Testbed;

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(pairs) = &cli.forward {
        return forwarder::run(pairs);
    }
    let plan = cli.plan();
    // A thousand long connections (or 8,190 idle tunnels) from cloud, and
    // the edge servers answering them, live in this process.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let steal_before = proc_stats::steal_ticks();
    let mut bed = Testbed::start()?;
    std::thread::sleep(Duration::from_secs(1));
    let mut memory = Memory::idle(&bed);

    let mut rows = Vec::new();
    let mut switches_per_round_trip = None;
    if cli.runs(Workload::Bulk) {
        rows.extend(bulk::run(&bed, &plan));
    }
    if cli.runs(Workload::PingPong) {
        let (ping_rows, switches) = ping_pong::run(&bed, &plan);
        rows.extend(ping_rows);
        switches_per_round_trip = Some(switches);
    }
    if cli.runs(Workload::ConnRate) {
        rows.extend(conn_rate::run(&bed, &plan));
    }
    if cli.runs(Workload::Echo) {
        rows.extend(echo::run(&bed, &plan));
    }
    memory.record_peak(&bed);
    let transports = if cli.runs(Workload::Transports) {
        transports::run(&mut bed, &plan)?
    } else {
        Vec::new()
    };
    let fleet = if cli.runs(Workload::Fleet) {
        Some(fleet_run::run(&bed, &plan)?)
    } else {
        None
    };
    let soak = if cli.runs(Workload::Soak) {
        Some(soak::run(&mut bed, &plan)?)
    } else {
        None
    };
    let attacks = if cli.runs(Workload::Attacks) {
        attacks::run(&mut bed, &plan)?
    } else {
        Vec::new()
    };
    let steal_after = proc_stats::steal_ticks();
    let steal_share =
        (steal_after.0 - steal_before.0) as f64 / (steal_after.1 - steal_before.1).max(1) as f64;

    let mut report = Report::new(
        &cli,
        steal_share,
        switches_per_round_trip,
        rows,
        memory,
        transports,
        fleet,
    );
    report.soak = soak;
    report.attacks = attacks;
    report.leftovers = std::mem::take(&mut *bed.leftovers.lock().expect("leftovers"));
    drop(bed);
    socket_mem::cleanup();
    report.write(&cli.json, cli.results.as_deref())?;
    if let Some(s) = &report.soak {
        if !s.passed() {
            anyhow::bail!(
                "the soak did not come back to its baseline, or connections failed while the \
                 agent was registered (see the table above)"
            );
        }
    }
    Ok(())
}
