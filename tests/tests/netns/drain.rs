//! An agent asked to stop (SIGTERM) with tunneled connections still open:
//! its log names each one (target, age, which directions are open) when
//! the drain starts and again when the grace period ends, so an operator
//! whose node will not drain sees what holds it; then the connections are
//! reset and the agent exits cleanly.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::netns::tunnel::{edge_ip, Edge, ECHO_PORT};
use e2e::netns::EDGE_IP;
use e2e::targets;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Allowed and redirected; here a target that says goodbye first: it
/// sends its FIN at once and then reads for good.
const HALF_CLOSING_PORT: u16 = 9100;

#[test]
fn a_draining_agent_names_the_streams_it_waits_for() {
    let Some(mut edge) = Edge::start(&["--drain-grace", "2s"]) else {
        return;
    };
    let _targets = edge.topo.edge.spawn_task(|| async {
        targets::echo_server_on(SocketAddr::new(edge_ip(), ECHO_PORT)).await;
        let l = transport::net::bind_tcp(SocketAddr::new(edge_ip(), HALF_CLOSING_PORT)).unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = tcp.write_all(b"bye").await;
                    let _ = tcp.shutdown().await;
                    let mut buf = [0u8; 1024];
                    while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
    });
    // Two clients in `cloud` that keep their connections open: one in
    // the middle of an echo session, one whose target has said all it will.
    let (ended_tx, ended) = std::sync::mpsc::channel();
    let _clients = edge.topo.cloud.spawn_task(move || async move {
        let mut echo = tokio::net::TcpStream::connect((EDGE_IP, ECHO_PORT))
            .await
            .expect("connect through the tunnel");
        echo.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        echo.read_exact(&mut pong).await.expect("echo");
        let mut quiet = tokio::net::TcpStream::connect((EDGE_IP, HALF_CLOSING_PORT))
            .await
            .expect("connect through the tunnel");
        let mut bye = Vec::new();
        quiet
            .read_to_end(&mut bye)
            .await
            .expect("the target's bytes, then its FIN");
        assert_eq!(bye, b"bye");
        tokio::spawn(async move {
            // Ends only when the agent gives up on it.
            let mut buf = [0u8; 16];
            let _ = ended_tx.send(echo.read(&mut buf).await);
            drop(quiet);
        });
    });
    let status = edge.agent.terminate();
    let log = edge.agent.log_text();
    assert!(status.success(), "agent exit {status}: {log}");
    let target = |port: u16| format!("{EDGE_IP}:{port}");
    for when in [
        "open stream: waiting for it to end",
        "open stream: reset: the grace period is over",
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(when)).collect();
        assert_eq!(lines.len(), 2, "{when}:\n{log}");
        assert!(
            lines.iter().any(|l| l.contains(&format!(
                "relaying with {}: target to tunnel open, tunnel to target open",
                target(ECHO_PORT)
            ))),
            "{log}"
        );
        assert!(
            lines.iter().any(|l| l.contains(&format!(
                "relaying with {}: target to tunnel finished, tunnel to target open",
                target(HALF_CLOSING_PORT)
            ))),
            "{log}"
        );
    }
    assert!(
        log.contains("grace period over; resetting the remaining streams"),
        "{log}"
    );
    // The clients see their connections end, not hang.
    let echo_end = ended
        .recv_timeout(Duration::from_secs(30))
        .expect("the held connection ends once the agent resets it");
    assert!(
        !matches!(echo_end, Ok(n) if n > 0),
        "the echo connection got data after the drain: {echo_end:?}"
    );
}
