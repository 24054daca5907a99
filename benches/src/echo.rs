//! Fan-out: many concurrent connections, each echoing 256 KiB checksummed.

use crate::cli::Plan;
use crate::load;
use crate::peers::Peer;
use crate::report::{peer_row, row, Row};
use crate::testbed::Testbed;

pub fn run(bed: &Testbed, plan: &Plan) -> Vec<Row> {
    let (d, t, sc, ac) = bed.pair("the echo", |p| {
        bed.in_cloud(|| load::fanout(Testbed::addr(p.echo), plan.fanout_conns, 256 * 1024))
    });
    let ok = t.0 / d.0 <= 2.0 && t.1 == 0;
    let mut rows = Vec::new();
    for peer in &bed.peers {
        let (v, cc, ec) = bed.peer(peer, |p| {
            bed.in_cloud(|| load::fanout(Peer::addr(p.echo), plan.fanout_conns, 256 * 1024))
        });
        rows.push(peer_row(
            &format!(
                "{} concurrent × 256 KiB echo: {} (failures {})",
                plan.fanout_conns, peer.name, v.1
            ),
            "s",
            d.0,
            v.0,
            t.0,
            (cc, ec),
        ));
    }
    rows.insert(
        0,
        row(
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
        ),
    );
    rows
}
