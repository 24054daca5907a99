//! Resource limits of the real `tunnel-server` binary, on loopback (no
//! root needed): started under a low open-files limit, flooded with idle
//! client connections, it keeps answering its liveness probe and serves
//! again once the flood is gone.

use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::netns::proc::bin;
use e2e::{connect_via, eventually, free_port, http_get, metric_in, KillOnDrop, Pki};
use tokio::net::TcpStream;

/// 600 idle clients against a server whose hard open-files limit is 512:
/// it raises its soft limit to 512, caps client connections at 256 (512
/// minus the 256 reserved), lets the rest wait in the listen backlog, and
/// `/healthz` keeps answering. Without the cap the server ran out of
/// descriptors and could not accept the liveness probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_cannot_exhaust_descriptors_under_a_low_limit() {
    e2e::init_logging();
    let pki = Pki::new();
    let (quic, connect, admin) = (free_port(), free_port(), free_port());
    let child = Command::new("prlimit")
        .arg("--nofile=512:512")
        .arg(bin("tunnel-server"))
        .args(["--listen", &quic.to_string()])
        .args(["--cert-dir", pki.server_dir().to_str().unwrap()])
        .args(["--connect-listen", &connect.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) and the tunnel-server binary");
    let _server = KillOnDrop(child);
    eventually("server ready", Duration::from_secs(10), || async {
        TcpStream::connect(admin).await.is_ok() && http_get(admin, "/readyz").await.0 == 200
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..600 {
        // The kernel completes the handshake from the backlog even when
        // the server does not accept.
        if let Ok(tcp) = TcpStream::connect(connect).await {
            idle.push(tcp);
        }
    }
    eventually("every slot taken", Duration::from_secs(10), || async {
        let page = http_get(admin, "/metrics").await.1;
        metric_in(&page, "edge_tunnel_client_connections ") == 256.0
            && metric_in(&page, "edge_tunnel_client_connection_limit_hits_total ") >= 1.0
    })
    .await;
    let page = http_get(admin, "/metrics").await.1;
    assert_eq!(
        metric_in(&page, "edge_tunnel_client_connection_limit "),
        256.0
    );
    // The kubelet gives a liveness probe one second by default; allow two.
    for _ in 0..20 {
        let probe = tokio::time::timeout(Duration::from_secs(2), http_get(admin, "/healthz"));
        assert_eq!(probe.await.expect("liveness probe answered").0, 200);
    }
    drop(idle);
    // Serving again: a CONNECT gets its answer (no agent: 503).
    eventually("CONNECT answers again", Duration::from_secs(20), || async {
        matches!(connect_via(connect, "edge-1:10250").await, Err((503, _)))
    })
    .await;
}
