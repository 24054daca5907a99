//! An agent or a server asked to stop (SIGTERM) with tunneled connections
//! still open: its log names each one (where it goes, how long it has
//! been open, which directions are still open) when the drain starts and
//! again when the grace period ends, so an operator whose process will not
//! drain sees what holds it; then the connections are closed and the
//! process exits cleanly.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::netns::probe::curl;
use e2e::netns::tunnel::{edge_ip, start_server_with, Edge, AGENT_ADMIN, ECHO_PORT};
use e2e::netns::{NsTask, CLOUD_IP, EDGE_IP};
use e2e::targets;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Allowed and redirected; here a target that says goodbye first: it
/// sends its FIN at once and then reads for good.
const HALF_CLOSING_PORT: u16 = 9100;

/// The targets, and two clients in `cloud` that keep their connections
/// open: one in the middle of an echo session, one whose target has said
/// all it will. The receiver gets what the echo client's next read
/// returned once its connection was closed from the tunnel's side.
fn hold_two_connections(
    edge: &Edge,
) -> (
    NsTask,
    NsTask,
    std::sync::mpsc::Receiver<std::io::Result<usize>>,
) {
    let targets = edge.topo.edge.spawn_task(|| async {
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
    let (ended_tx, ended) = std::sync::mpsc::channel();
    let clients = edge.topo.cloud.spawn_task(move || async move {
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
            // Ends only when the tunnel gives up on it.
            let mut buf = [0u8; 16];
            let _ = ended_tx.send(echo.read(&mut buf).await);
            drop(quiet);
        });
    });
    (targets, clients, ended)
}

/// Both connections named with their state in `log`, when the drain
/// started (`waiting`) and when its grace ran out (`closing`).
fn assert_named(log: &str, waiting: &str, closing: &str, echo: &str, half_closed: &str) {
    for when in [waiting, closing] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(when)).collect();
        assert_eq!(lines.len(), 2, "{when}:\n{log}");
        for state in [echo, half_closed] {
            assert!(
                lines.iter().any(|l| l.contains(state)),
                "no {state:?} in {when:?} lines:\n{log}"
            );
        }
    }
}

/// The echo client's connection ends once the tunnel closes it, and got
/// nothing more.
fn assert_ended(ended: &std::sync::mpsc::Receiver<std::io::Result<usize>>) {
    let end = ended
        .recv_timeout(Duration::from_secs(30))
        .expect("the held connection ends once the tunnel closes it");
    assert!(
        !matches!(end, Ok(n) if n > 0),
        "the echo connection got data after the drain: {end:?}"
    );
}

#[test]
fn a_draining_agent_names_the_streams_it_waits_for() {
    let Some(mut edge) = Edge::start(&["--drain-grace", "2s"]) else {
        return;
    };
    let (_targets, _clients, ended) = hold_two_connections(&edge);
    // The admin port lists both, oldest first, with where they stand.
    let page = curl(
        &edge.topo.edge,
        &[&format!("http://{AGENT_ADMIN}/v1/streams")],
    );
    let page: serde_json::Value = serde_json::from_str(&page).expect("JSON");
    assert_eq!(page["open"], 2, "{page}");
    let (echo, quiet) = (&page["oldest"][0], &page["oldest"][1]);
    assert_eq!(echo["target"], format!("{EDGE_IP}:{ECHO_PORT}"), "{page}");
    assert_eq!(
        quiet["target"],
        format!("{EDGE_IP}:{HALF_CLOSING_PORT}"),
        "{page}"
    );
    for s in [echo, quiet] {
        assert_eq!(s["step"], "relaying", "{page}");
        assert_eq!(s["server"], format!("{CLOUD_IP}:8443"), "{page}");
        assert_eq!(s["tunnel_to_target_finished"], false, "{page}");
    }
    assert_eq!(
        echo["connection"], quiet["connection"],
        "one connection: {page}"
    );
    assert_eq!(echo["target_to_tunnel_finished"], false, "{page}");
    assert_eq!(quiet["target_to_tunnel_finished"], true, "{page}");
    let status = edge.agent.terminate();
    let log = edge.agent.log_text();
    assert!(status.success(), "agent exit {status}: {log}");
    assert_named(
        &log,
        "open stream: waiting for it to end",
        "open stream: reset: the grace period is over",
        &format!(
            "relaying with {EDGE_IP}:{ECHO_PORT}: target to tunnel open, tunnel to target open"
        ),
        &format!(
            "relaying with {EDGE_IP}:{HALF_CLOSING_PORT}: \
             target to tunnel finished, tunnel to target open"
        ),
    );
    assert!(
        log.contains("grace period over; resetting the remaining streams"),
        "{log}"
    );
    assert_ended(&ended);
}

#[test]
fn a_draining_server_names_the_connections_it_waits_for() {
    let Some(mut edge) = Edge::start(&[]) else {
        return;
    };
    // The standard server drains for 20 s; this one for 2.
    assert!(edge.server.terminate().success());
    edge.server = start_server_with(&edge.topo, &edge.certs, &["--drain-grace", "2s"]);
    edge.wait_registered(Duration::from_secs(15));
    let (_targets, _clients, ended) = hold_two_connections(&edge);
    let status = edge.server.terminate();
    let log = edge.server.log_text();
    assert!(status.success(), "server exit {status}: {log}");
    assert_named(
        &log,
        "open tunneled connection: waiting for it to end",
        "open tunneled connection: closed: the grace period is over",
        &format!(
            "to {EDGE_IP}:{ECHO_PORT} on node edge-1 (transparent): \
             client to tunnel open, tunnel to client open"
        ),
        &format!(
            "to {EDGE_IP}:{HALF_CLOSING_PORT} on node edge-1 (transparent): \
             client to tunnel open, tunnel to client finished"
        ),
    );
    assert_ended(&ended);
}
