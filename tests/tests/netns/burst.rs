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
/// Enough to fill the agent connection's 4 MiB window many times over
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
        // The echo finished while the slow dials were still waiting.
        assert_no_dial_timed_out(&edge);
        for t in slow {
            t.abort();
        }
    });
}

/// Connections in the burst after the quiet spell.
const BURST: usize = 100;
/// What each of them uploads.
const UPLOAD: usize = 256 * 1024;
/// Reads to EOF and answers a digest: the burst's uploads go one way,
/// so the agent sends nothing back but ACKs while they run.
const DIGEST_PORT: u16 = 9100;
/// Quiet spells, each followed by a burst.
const SPELLS: usize = 3;

/// A sender that asks its peer for fewer ACKs than its congestion window
/// can hold gets one ACK per `max_ack_delay` (25 ms) once the window is
/// small: a few packets per 25 ms. BBR's rate estimate, made from those
/// ACKs, then keeps the window small. After a bulk transfer (BBR leaves
/// its start-up mode for good) and a spell of small exchanges (its rate
/// estimate comes down to them), on a path shorter than 25 ms, the window
/// stayed at its floor: at an ACK every 10 packets, uploads crawled at
/// ~400 KB/s for 10-20 s and new connections' dials timed out. Every end
/// now asks for an ACK at least once per minimum window.
#[test]
fn uploads_after_a_quiet_spell_are_not_held_at_the_minimum_window() {
    let Some(edge) = Edge::start(&[]) else {
        return;
    };
    let _targets = edge.topo.edge.spawn_task(|| async {
        targets::echo_server_on(SocketAddr::new(edge_ip(), ECHO_PORT)).await;
        targets::digest_after_eof_server_on(SocketAddr::new(edge_ip(), DIGEST_PORT)).await;
    });
    edge.topo.cloud.block_on(|| async {
        use tokio::io::AsyncReadExt;
        // A bulk transfer: BBR finds the path's full rate.
        let tcp = tokio::net::TcpStream::connect((EDGE_IP, ECHO_PORT))
            .await
            .expect("connect through the tunnel");
        let (sent, echoed) = echo_digest(tcp, 128 << 20, 12).await;
        assert_eq!(sent, echoed);
        let data = targets::pattern(UPLOAD, 13);
        let want = format!(
            "sha256:{} bytes:{UPLOAD}",
            targets::hex(&<sha2::Sha256 as sha2::Digest>::digest(&data))
        );
        // The window falls to its floor at every quiet spell, but whether
        // it stays there depends on how the first ACKs after it bunch up:
        // without the fix, one spell in three or four crawled.
        for spell in 0..SPELLS {
            // Small exchanges only.
            let mut tcp = tokio::net::TcpStream::connect((EDGE_IP, ECHO_PORT))
                .await
                .expect("connect through the tunnel");
            let mut byte = [0u8; 64];
            for _ in 0..3000 {
                tcp.write_all(&byte).await.expect("ping");
                tcp.read_exact(&mut byte).await.expect("pong");
            }
            drop(tcp);
            // Longer than BBR keeps a min-RTT sample: the uploads start
            // with a probe at the smallest window.
            tokio::time::sleep(Duration::from_secs(11)).await;
            let mut burst = Vec::new();
            for _ in 0..BURST {
                let data = data.clone();
                burst.push(tokio::spawn(async move {
                    let mut tcp = tokio::net::TcpStream::connect((EDGE_IP, DIGEST_PORT)).await?;
                    tcp.write_all(&data).await?;
                    tcp.shutdown().await?;
                    let mut reply = String::new();
                    tcp.read_to_string(&mut reply).await?;
                    Ok::<_, std::io::Error>(reply)
                }));
            }
            // 25 MiB through the tunnel: well under a second here, a
            // minute at a few packets per 25 ms.
            let all = async {
                for t in burst {
                    let reply = t.await.expect("task").expect("upload");
                    assert_eq!(reply, want);
                }
            };
            tokio::time::timeout(Duration::from_secs(10), all)
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "the uploads after quiet spell {spell} crawled\nserver log:\n{}",
                        edge.server.log_text()
                    )
                });
        }
        assert_no_dial_timed_out(&edge);
    });
}

/// No dial through `edge`'s server has hit its deadline so far.
fn assert_no_dial_timed_out(edge: &Edge) {
    let metrics = curl(&edge.topo.cloud, &[&format!("http://{ADMIN}/metrics")]);
    assert_eq!(
        metric_in(
            &metrics,
            "edge_tunnel_dial_failures_total{reason=\"timeout\"} "
        ),
        0.0,
        "a dial timed out\nserver log:\n{}",
        edge.server.log_text()
    );
}
