//! UDP blocked at the router: an `auto` agent serves over HTTP/2 and
//! returns to QUIC, keeping a stream open across the switch; a `quic`-only
//! agent keeps retrying and says why.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e::netns::probe::curl;
use e2e::netns::tunnel::{
    certs, edge_ip, spawn_kubelet, start_agent, start_server, Edge, ADMIN, AGENT_ADMIN, ECHO_PORT,
};
use e2e::netns::{self, Topology, EDGE_IP};
use e2e::targets::{self, hex, pattern};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn auto_falls_back_to_h2_without_udp_and_returns_to_quic() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    topo.block_udp(true);
    let kubelet = spawn_kubelet(&topo, &certs);
    let _echo = topo.edge.spawn_task(|| async {
        targets::echo_server_on(SocketAddr::new(edge_ip(), ECHO_PORT)).await;
    });
    let server = start_server(&topo, &certs);
    let started = Instant::now();
    let agent = start_agent(
        &topo,
        &certs,
        &[
            "--transport",
            "auto",
            "--quic-timeout",
            "2",
            "--reprobe-interval",
            "3",
        ],
    );
    let edge = Edge {
        certs,
        server,
        agent,
        kubelet,
        topo,
    };
    // Serving over HTTP/2 within 10 s of start.
    edge.wait_registered(Duration::from_secs(10));
    assert_eq!(edge.agent_transport().as_deref(), Some("h2"));
    assert!(started.elapsed() < Duration::from_secs(10));
    let cacert = edge.certs.kubelet_dir.join("ca.crt");
    let url = format!("https://{EDGE_IP}:10250/healthz");
    assert_eq!(
        curl(
            &edge.topo.cloud,
            &["--cacert", cacert.to_str().unwrap(), &url]
        ),
        "ok from kubelet-like\n"
    );
    // A stream that stays open across the switch back to QUIC.
    let cloud = netns::Ns {
        name: edge.topo.cloud.name.clone(),
    };
    let long_stream = std::thread::spawn(move || {
        cloud.block_on(|| async {
            let mut tcp = tokio::net::TcpStream::connect((EDGE_IP, ECHO_PORT))
                .await
                .unwrap();
            let mut sent = Sha256::new();
            let mut got = Sha256::new();
            let mut buf = vec![0u8; 4096];
            for i in 0..800u64 {
                let chunk = pattern(1024, i);
                tcp.write_all(&chunk).await.unwrap();
                sent.update(&chunk);
                tcp.read_exact(&mut buf[..1024]).await.unwrap();
                got.update(&buf[..1024]);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (hex(&sent.finalize()), hex(&got.finalize()))
        })
    });
    std::thread::sleep(Duration::from_secs(1));
    edge.topo.block_udp(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while edge.agent_transport().as_deref() != Some("quic") {
        assert!(
            Instant::now() < deadline,
            "never moved back to QUIC:\n{}",
            edge.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (sent, echoed) = long_stream.join().expect("the stream across the switch");
    assert_eq!(sent, echoed);
    assert_eq!(
        curl(
            &edge.topo.cloud,
            &["--cacert", cacert.to_str().unwrap(), &url]
        ),
        "ok from kubelet-like\n"
    );
    let log = edge.agent.log_text();
    assert!(log.contains("falling back to HTTP/2"), "{log}");
    assert!(log.contains("QUIC works again"), "{log}");
    // The agent counts both, and says which transport each replica uses.
    let metrics = curl(&edge.topo.edge, &[&format!("http://{AGENT_ADMIN}/metrics")]);
    assert!(
        metrics.contains("edge_tunnel_agent_transport_fallbacks_total{reason=\"quic_timeout\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edge_tunnel_agent_quic_reprobes_total{result=\"quic_back\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edge_tunnel_agent_replicas_connected{transport=\"quic\"} 1"),
        "{metrics}"
    );
    let replicas = curl(
        &edge.topo.edge,
        &[&format!("http://{AGENT_ADMIN}/v1/replicas")],
    );
    assert!(replicas.contains("\"transport\": \"quic\""), "{replicas}");
}

#[test]
fn quic_only_agent_without_udp_retries_and_says_why() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    topo.block_udp(true);
    let server = start_server(&topo, &certs);
    let agent = start_agent(
        &topo,
        &certs,
        &["--transport", "quic", "--connect-timeout", "2"],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = agent.log_text();
        if log.matches("UDP blocked or server down?").count() >= 2
            && log.contains("reconnecting in")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent log does not say why:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let agents = curl(&topo.cloud, &[&format!("http://{ADMIN}/v1/agents")]);
    assert!(!agents.contains("edge-1"), "{agents}");
    drop(server);
}

/// A rolling update, with real binaries across the NAT: the server goes
/// away (SIGTERM) and comes back 4 s later. While it is down QUIC gets no
/// answer and TCP is refused — no reason to fall back: the `auto` agent
/// is back on QUIC and counted no fallback.
#[test]
fn auto_agent_is_back_on_quic_after_a_server_restart() {
    let Some(mut edge) = Edge::start(&["--transport", "auto", "--quic-timeout", "1"]) else {
        return;
    };
    assert_eq!(edge.agent_transport().as_deref(), Some("quic"));
    assert!(edge.server.terminate().success());
    std::thread::sleep(Duration::from_secs(4));
    edge.server = start_server(&edge.topo, &edge.certs);
    edge.wait_registered(Duration::from_secs(20));
    assert_eq!(
        edge.agent_transport().as_deref(),
        Some("quic"),
        "agent log:\n{}",
        edge.agent.log_text()
    );
    let metrics = curl(&edge.topo.edge, &[&format!("http://{AGENT_ADMIN}/metrics")]);
    assert!(
        !metrics.contains("edge_tunnel_agent_transport_fallbacks_total{"),
        "{metrics}\nagent log:\n{}",
        edge.agent.log_text()
    );
    let log = edge.agent.log_text();
    assert!(log.contains("trying HTTP/2"), "both were tried:\n{log}");
    assert!(!log.contains("falling back to HTTP/2"), "{log}");
}
