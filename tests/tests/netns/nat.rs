//! The topology itself: without the tunnel, the NAT really stops the
//! cloud from reaching the edge.

use std::time::Duration;

use e2e::netns::tunnel::{certs, spawn_kubelet};
use e2e::netns::{self, Topology, EDGE_IP};

#[test]
fn the_nat_is_real_without_the_tunnel() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    let _kubelet = spawn_kubelet(&topo, &certs);
    // The kubelet is up (reachable inside the edge)...
    let edge_view = topo.edge.block_on(|| async {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect((EDGE_IP, 10250))
                .await
                .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    assert!(
        edge_view,
        "the kubelet-like server never listened in the edge"
    );
    // ...but the cloud cannot open a connection to it through the NAT.
    let cloud_view = topo.cloud.block_on(|| async {
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((EDGE_IP, 10250)),
        )
        .await
    });
    assert!(
        !matches!(cloud_view, Ok(Ok(_))),
        "cloud reached the edge directly: {cloud_view:?}"
    );
}
