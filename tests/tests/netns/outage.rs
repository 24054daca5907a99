//! A bad link: 100 MiB intact through 2% packet loss, and a reconnect
//! after a 10 s outage.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::netns::probe::{curl, curl_with_errors};
use e2e::netns::tunnel::{edge_ip, Edge, ADMIN, ECHO_PORT};
use e2e::netns::EDGE_IP;
use e2e::targets;

#[test]
fn hundred_mib_arrive_intact_with_2_percent_loss_quic() {
    hundred_mib_arrive_intact_with_2_percent_loss("quic")
}

#[test]
fn hundred_mib_arrive_intact_with_2_percent_loss_h2() {
    hundred_mib_arrive_intact_with_2_percent_loss("h2")
}

fn hundred_mib_arrive_intact_with_2_percent_loss(transport: &str) {
    let Some(edge) = Edge::start(&["--transport", transport]) else {
        return;
    };
    let _echo = edge.topo.edge.spawn_task(|| async {
        targets::echo_server_on(SocketAddr::new(edge_ip(), ECHO_PORT)).await;
    });
    edge.topo.set_loss(0.02);
    let (sent, echoed) = edge.topo.cloud.block_on(|| async {
        let tcp = tokio::net::TcpStream::connect((EDGE_IP, ECHO_PORT))
            .await
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(600),
            targets::echo_digest(tcp, 100 << 20, 11),
        )
        .await
        .expect("100 MiB echo finished")
    });
    assert_eq!(sent, echoed);
}

#[test]
fn agent_reconnects_after_a_10s_outage_quic() {
    agent_reconnects_after_a_10s_outage("quic")
}

#[test]
fn agent_reconnects_after_a_10s_outage_h2() {
    agent_reconnects_after_a_10s_outage("h2")
}

fn agent_reconnects_after_a_10s_outage(transport: &str) {
    // A short idle timeout makes the outage kill the QUIC connection, so
    // this proves a real reconnect, not a connection that rode it out.
    let Some(edge) = Edge::start(&[
        "--keepalive",
        "1",
        "--idle-timeout",
        "3",
        "--transport",
        transport,
    ]) else {
        return;
    };
    let cloud = &edge.topo.cloud;
    let cacert = edge.certs.kubelet_dir.join("ca.crt");
    let url = format!("https://{EDGE_IP}:10250/healthz");
    let (body, error) = curl_with_errors(cloud, &["--cacert", cacert.to_str().unwrap(), &url]);
    assert_eq!(
        body,
        "ok from kubelet-like\n",
        "curl: {error}\nconntrack:\n{}\nrules:\n{}\nserver log:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&cloud.sh(&["conntrack", "-L"]).stdout),
        String::from_utf8_lossy(&cloud.sh(&["iptables-save", "-t", "nat"]).stdout),
        edge.server.log_text(),
        edge.agent.log_text()
    );
    edge.topo.cut_link();
    std::thread::sleep(Duration::from_secs(10));
    // The server noticed the agent is gone.
    let agents = curl(cloud, &[&format!("http://{ADMIN}/v1/agents")]);
    assert!(!agents.contains("edge-1"), "{agents}");
    edge.topo.restore_link();
    // Back within the backoff (at most 16 s after four failures) plus a handshake.
    edge.wait_registered(Duration::from_secs(40));
    assert_eq!(
        curl_with_errors(cloud, &["--cacert", cacert.to_str().unwrap(), &url]).0,
        "ok from kubelet-like\n",
        "server log:\n{}\nagent log:\n{}",
        edge.server.log_text(),
        edge.agent.log_text()
    );
    assert!(
        edge.agent.log_text().contains("reconnecting in"),
        "{}",
        edge.agent.log_text()
    );
}
