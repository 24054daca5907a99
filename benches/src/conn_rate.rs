//! Connection rate: new connection + one 64-byte request/response, at
//! concurrency 1 and 64, on every path.

use crate::cli::Plan;
use crate::load;
use crate::peers::Peer;
use crate::report::{peer_row, row, Row, REFERENCE};
use crate::testbed::Testbed;

pub fn run(bed: &Testbed, plan: &Plan) -> Vec<Row> {
    let mut rows = Vec::new();
    for c in [1usize, 64] {
        let (d, t, sc, ac) = bed.pair("the connection rate", |p| {
            bed.in_cloud(|| load::conn_rate(Testbed::addr(p.echo), plan.conns, c))
        });
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
        for peer in &bed.peers {
            let (v, cc, ec) = bed.peer(peer, |p| {
                bed.in_cloud(|| load::conn_rate(Peer::addr(p.echo), plan.conns, c))
            });
            rows.push(peer_row(
                &format!(
                    "new conn + 64 B req/resp, c={c}: {} (failures {})",
                    peer.name, v.1
                ),
                "conn/s",
                d.0,
                v.0,
                t.0,
                (cc, ec),
            ));
        }
        let (f, fc, ec) = bed.floor(|p| {
            bed.in_cloud(|| load::conn_rate(Testbed::floor_addr(p.echo), plan.conns, c))
        });
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
    rows
}
