//! QUIC and HTTP/2 side by side, then the head-of-line case: a 64-byte
//! ping-pong next to a bulk download through the same agent, with 1% loss
//! and a 50 Mbit/s cap at the router.

use std::time::Duration;

use anyhow::Result;

use crate::cli::Plan;
use crate::load;
use crate::report::{mbit, us, TransportRow};
use crate::testbed::{Testbed, TUNNEL};

/// Restarts the agent on each transport in turn and measures it.
pub fn run(bed: &mut Testbed, plan: &Plan) -> Result<Vec<TransportRow>> {
    let mut transports = Vec::new();
    for transport in ["quic", "h2"] {
        bed.restart_agent(transport)?;
        let bulk =
            bed.in_cloud(|| load::bulk(Testbed::addr(TUNNEL.source), false, 1, plan.bulk_secs));
        let mut pp = bed.in_cloud(|| load::ping_pong(Testbed::addr(TUNNEL.echo), plan.ping_pongs));
        pp.sort();
        let (rate, _) = bed.in_cloud(|| load::conn_rate(Testbed::addr(TUNNEL.echo), plan.conns, 1));
        bed.topo.shape(Some((50, 0.01)));
        let hol = bed.in_cloud(|| async {
            let bulk = load::bulk(Testbed::addr(TUNNEL.source), false, 1, plan.hol_secs);
            let pings = async {
                // Let the bulk transfer fill the link first.
                tokio::time::sleep(Duration::from_millis(500)).await;
                load::ping_pong(Testbed::addr(TUNNEL.echo), plan.hol_pings).await
            };
            let (_, mut pings) = tokio::join!(bulk, pings);
            pings.sort();
            pings
        });
        bed.topo.shape(None);
        bed.settle(&format!("after the {transport} transport's workloads"));
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
    Ok(transports)
}
