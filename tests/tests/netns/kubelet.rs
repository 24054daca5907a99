//! kube-apiserver's view: HTTPS, a `kubectl logs -f`-like stream and a
//! `kubectl exec`-like WebSocket to the node's address, through DNAT and
//! the tunnel; a stopped server leaves no rules.

use e2e::netns::probe::curl;
use e2e::netns::tunnel::{edge_ip, Edge, ADMIN, AGENT_ADMIN};
use e2e::netns::EDGE_IP;
use e2e::targets;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[test]
fn kubelet_https_logs_and_exec_through_dnat_then_rules_are_removed_quic() {
    kubelet_https_logs_and_exec_through_dnat_then_rules_are_removed("quic")
}

#[test]
fn kubelet_https_logs_and_exec_through_dnat_then_rules_are_removed_h2() {
    kubelet_https_logs_and_exec_through_dnat_then_rules_are_removed("h2")
}

fn kubelet_https_logs_and_exec_through_dnat_then_rules_are_removed(transport: &str) {
    let Some(mut edge) = Edge::start(&["--transport", transport]) else {
        return;
    };
    assert!(
        curl(&edge.topo.cloud, &[&format!("http://{ADMIN}/v1/agents")])
            .contains(&format!("\"transport\": \"{transport}\""))
    );
    let cloud = &edge.topo.cloud;
    let cacert = edge.certs.kubelet_dir.join("ca.crt");
    let cacert = cacert.to_str().unwrap();
    // kube-apiserver's view: it just dials the node's InternalIP.
    let body = curl(
        cloud,
        &[
            "--cacert",
            cacert,
            &format!("https://{EDGE_IP}:10250/healthz"),
        ],
    );
    assert_eq!(body, "ok from kubelet-like\n");
    // Streaming (kubectl logs -f): every line arrives.
    let logs = curl(
        cloud,
        &[
            "-N",
            "--cacert",
            cacert,
            &format!("https://{EDGE_IP}:10250/logs"),
        ],
    );
    assert_eq!(logs.lines().count(), 30, "{logs}");
    assert_eq!(logs.lines().last(), Some("log line 29"));
    // Interactive (kubectl exec): WebSocket echo from the cloud namespace.
    let roots = edge.certs.kubelet_roots.clone();
    cloud.block_on(|| async move {
        let tcp = tokio::net::TcpStream::connect((EDGE_IP, 10250))
            .await
            .unwrap();
        let tls = targets::tls_connect(tcp, &roots, edge_ip()).await;
        let (mut ws, resp) =
            tokio_tungstenite::client_async(format!("wss://{EDGE_IP}:10250/exec"), tls)
                .await
                .unwrap();
        assert_eq!(resp.status(), 101);
        for i in 0..50 {
            let msg = WsMessage::text(format!("keystroke {i}"));
            ws.send(msg.clone()).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), msg);
        }
        ws.close(None).await.unwrap();
    });
    // The metrics saw the transparent streams.
    let metrics = curl(cloud, &[&format!("http://{ADMIN}/metrics")]);
    assert!(
        metrics.contains("edge_tunnel_streams_total{ingress=\"transparent\"} 3"),
        "{metrics}"
    );
    // The server asked for, and the agent held, every answer for the
    // kubelet's first bytes (how each went out depends on timing). Counted
    // as each stream ends, so the last may take a moment.
    let held = || {
        let page = curl(&edge.topo.edge, &[&format!("http://{AGENT_ADMIN}/metrics")]);
        let held: f64 = page
            .lines()
            .filter(|l| l.starts_with("edge_tunnel_agent_dial_results_held_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (held, page)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while held().0 < 3.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (held, page) = held();
    assert_eq!(held, 3.0, "{page}");
    // Stopping the server removes every rule it wrote.
    let status = edge.server.terminate();
    assert!(
        status.success(),
        "server exit {status}: {}",
        edge.server.log_text()
    );
    let rules = String::from_utf8_lossy(&cloud.sh(&["iptables-save"]).stdout).into_owned();
    assert!(!rules.contains("TUNNEL-DNAT"), "left behind:\n{rules}");
    let status = edge.agent.terminate();
    assert!(status.success(), "agent exit {status}");
}
