//! A server shutting down with `--drain-grace` (#15): readiness fails at
//! once, its agents are told and hold another replica meanwhile (a new
//! registration here is refused), open tunnels keep flowing and new ones
//! still get through while clients are being moved away, and the server
//! exits as soon as the last tunnel ends rather than at the end of the
//! grace.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::{connect_via, init_logging, targets, Pki, TestAgent, TestServer};

const NODE: &str = "edge-1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_finishes_open_tunnels_then_exits() {
    init_logging();
    let echo: SocketAddr = targets::echo_server().await;
    let pki = Pki::new();
    pki.issue_agent(NODE, &["127.0.0.1".parse().unwrap()]);
    let mut settings = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
    // Far longer than the test: it must end when the tunnels do.
    settings.drain_grace = Duration::from_secs(120);
    let mut server = TestServer::start_with(settings).await;
    let allow = vec![format!("127.0.0.1:{}", echo.port())];
    let agent = TestAgent::start(TestAgent::config(&pki, NODE, server.addrs.quic, &allow));
    server.wait_for_agent(NODE, Duration::from_secs(10)).await;
    let proxy = server.connect_addr();
    let admin = server.addrs.admin.unwrap();
    let mut before = connect_via(proxy, &echo.to_string()).await.unwrap();
    e2e::echo_round_trip(&mut before, b"before the drain").await;

    server.begin_stop();
    e2e::eventually("readiness fails", Duration::from_secs(5), || async move {
        e2e::http_get(admin, "/readyz").await.0 == 503
    })
    .await;
    // The agent was told: it dials again for another replica, and this
    // one refuses it.
    e2e::eventually(
        "the agent is told and its new registration refused",
        Duration::from_secs(15),
        || async {
            e2e::metric_in(
                &e2e::http_get(admin, "/metrics").await.1,
                "edge_tunnel_registration_refusals_total{reason=\"server_draining\"}",
            ) >= 1.0
        },
    )
    .await;
    // The tunnel open before the drain still flows, and a client still
    // routed here gets through.
    e2e::echo_round_trip(&mut before, b"during the drain").await;
    let mut during = connect_via(proxy, &echo.to_string()).await.unwrap();
    e2e::echo_round_trip(&mut during, b"opened during the drain").await;
    assert!(!server.has_stopped(), "tunnels are open: the server waits");
    // The last tunnels end: the server exits long before its grace.
    drop(before);
    drop(during);
    e2e::eventually(
        "the server exits once its tunnels are done",
        Duration::from_secs(30),
        || async { server.has_stopped() },
    )
    .await;
    agent.stop().await;
}
