//! A burst of new transparent connections whose dials are slow (the
//! target's accept backlog overflowing, so connects wait on SYN retries)
//! must not stop the agent connection for everyone else.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::metric_in;
use e2e::netns::probe::curl;
use e2e::netns::tunnel::{edge_ip, Edge, ADMIN, ECHO_PORT};
use e2e::netns::EDGE_IP;
use e2e::targets::{self, echo_digest};
use tokio::io::AsyncWriteExt;

/// Allowed and redirected, but the edge drops every SYN to it: each dial
/// waits until its deadline.
const SLOW_PORT: u16 = 9100;
/// Each slow connection sends this much right away, as a client that
/// speaks first does (a TLS handshake, a request body).
const EAGER: usize = 256 * 1024;
/// Enough to fill the agent connection's 8 MiB window many times over
/// were all of it sent ahead of the dial answers.
const SLOW_CONNECTIONS: usize = 48;

/// Before the bound on what goes ahead of the dial answer, the slow
/// streams' data filled the agent connection's window; every other stream
/// stopped, new connections' `Dial` frames included, until the slow dials
/// hit their deadline (12 s). Now an echo through the same agent completes
/// while the slow dials are still waiting.
#[test]
fn slow_dials_do_not_starve_the_agent_connection() {
    let Some(edge) = Edge::start(&[]) else {
        return;
    };
    let _echo = edge.topo.edge.spawn_task(|| async {
        targets::echo_server_on(SocketAddr::new(edge_ip(), ECHO_PORT)).await;
    });
    let port = SLOW_PORT.to_string();
    let out = edge.topo.edge.sh(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", &port, "--syn", "-j", "DROP",
    ]);
    assert!(out.status.success(), "iptables: {out:?}");
    edge.topo.cloud.block_on(|| async {
        let mut slow = Vec::new();
        for _ in 0..SLOW_CONNECTIONS {
            slow.push(tokio::spawn(async {
                let mut tcp = tokio::net::TcpStream::connect((EDGE_IP, SLOW_PORT)).await?;
                tcp.write_all(&vec![1u8; EAGER]).await?;
                Ok::<_, std::io::Error>(tcp)
            }));
        }
        // Their streams are open and their first bytes on the way.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let echo = async {
            let tcp = tokio::net::TcpStream::connect((EDGE_IP, ECHO_PORT))
                .await
                .expect("connect through the tunnel");
            echo_digest(tcp, 1 << 20, 11).await
        };
        // Well before the slow dials' deadline (10 s + 2 s margin).
        let (sent, echoed) = tokio::time::timeout(Duration::from_secs(8), echo)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the echo waited behind the slow dials\nserver log:\n{}",
                    edge.server.log_text()
                )
            });
        assert_eq!(sent, echoed);
        let metrics = curl(&edge.topo.cloud, &[&format!("http://{ADMIN}/metrics")]);
        assert_eq!(
            metric_in(
                &metrics,
                "edge_tunnel_dial_failures_total{reason=\"timeout\"} "
            ),
            0.0,
            "the echo finished while the slow dials were still waiting"
        );
        for t in slow {
            t.abort();
        }
    });
}
