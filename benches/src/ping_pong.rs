//! 64-byte ping-pong: latency percentiles of the direct path, the tunnel
//! and the reference forwarders, and the context switches per round trip.

use crate::cli::Plan;
use crate::load;
use crate::peers::Peer;
use crate::proc_stats::{context_switches, cpu_during};
use crate::report::{peer_row, row, us, Row, REFERENCE};
use crate::testbed::{Testbed, DIRECT, FLOOR, TUNNEL};

/// The rows, and the context switches per round trip of server, agent,
/// cloud forwarder and edge forwarder.
pub fn run(bed: &Testbed, plan: &Plan) -> (Vec<Row>, [f64; 4]) {
    // Interleaved in blocks rather than one path after the other: this
    // workload is dominated by wake-up latency, which drifts on a VM.
    let pids = [
        bed.server.pid(),
        bed.agent.pid(),
        bed.floor.0.pid(),
        bed.floor.1.pid(),
    ];
    let switches_before = pids.map(context_switches);
    let mut addrs = vec![
        Testbed::addr(DIRECT.echo),
        Testbed::addr(TUNNEL.echo),
        Testbed::floor_addr(FLOOR.echo),
    ];
    addrs.extend(bed.peers.iter().map(|p| Peer::addr(p.ports.echo)));
    let (mut times, [sc, ac, fc, ec]) = cpu_during(pids, || {
        bed.in_cloud(|| load::ping_pong_interleaved(&addrs, plan.ping_pongs, 500))
    });
    bed.settle("after the ping-pong");
    // The peers' samples come last, in the order of `bed.peers`.
    let mut peer_times: Vec<_> = times.split_off(3.min(times.len()));
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
    f.sort();
    d.sort();
    t.sort();
    let mut rows = Vec::new();
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
    for (peer, samples) in bed.peers.iter().zip(peer_times.iter_mut()) {
        samples.sort();
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            let (dv, pv, tv) = (
                us(load::percentile(&d, q)),
                us(load::percentile(samples, q)),
                us(load::percentile(&t, q)),
            );
            rows.push(peer_row(
                &format!("64 B ping-pong {name}: {}", peer.name),
                "µs",
                dv,
                pv,
                tv,
                (0.0, 0.0),
            ));
        }
    }
    (rows, per_round_trip)
}
