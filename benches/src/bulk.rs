//! Bulk transfer: one connection up and down (and down through the
//! reference forwarders), then eight connections down.

use crate::cli::Plan;
use crate::load;
use crate::peers::Peer;
use crate::report::{mbit, peer_row, row, Row, REFERENCE};
use crate::testbed::Testbed;

pub fn run(bed: &Testbed, plan: &Plan) -> Vec<Row> {
    let mut rows = Vec::new();
    for (upload, label) in [
        (true, "bulk 1 stream, upload (cloud→edge)"),
        (false, "bulk 1 stream, download (edge→cloud)"),
    ] {
        let (d, t, sc, ac) = bed.pair(label, |p| {
            let port = if upload { p.sink } else { p.source };
            bed.in_cloud(|| load::bulk(Testbed::addr(port), upload, 1, plan.bulk_secs))
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
        for peer in &bed.peers {
            let (v, cc, ec) = bed.peer(peer, |p| {
                let port = if upload { p.sink } else { p.source };
                bed.in_cloud(|| load::bulk(Peer::addr(port), upload, 1, plan.bulk_secs))
            });
            rows.push(peer_row(
                &format!("{label}: {}", peer.name),
                "Mbit/s",
                mbit(d),
                mbit(v),
                mbit(t),
                (cc, ec),
            ));
        }
        if !upload {
            let (f, cc, ec) = bed.floor(|p| {
                bed.in_cloud(|| load::bulk(Testbed::floor_addr(p.source), false, 1, plan.bulk_secs))
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
    let (d, t, sc, ac) = bed.pair("bulk 8 streams", |p| {
        bed.in_cloud(|| load::bulk(Testbed::addr(p.source), false, 8, plan.bulk_secs))
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
    for peer in &bed.peers {
        let (v, cc, ec) = bed.peer(peer, |p| {
            bed.in_cloud(|| load::bulk(Peer::addr(p.source), false, 8, plan.bulk_secs))
        });
        rows.push(peer_row(
            &format!("bulk 8 streams, download: {}", peer.name),
            "Mbit/s",
            mbit(d),
            mbit(v),
            mbit(t),
            (cc, ec),
        ));
    }
    rows
}
