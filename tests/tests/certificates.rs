//! Certificate visibility (#16): when the server's own certificate, the
//! connected agents' and each agent's own expire, in metrics and in
//! `/v1/agents`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::{free_port, init_logging, metric_in, targets, Pki, TestAgent, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_visible_on_both_ends() {
    init_logging();
    let echo = targets::echo_server().await;
    let pki = Pki::new();
    pki.issue_agent("edge-1", &["127.0.0.1".parse().unwrap()]);
    let server = TestServer::start(&pki).await;
    let mut config = TestAgent::config(
        &pki,
        "edge-1",
        server.addrs.quic,
        &[format!("127.0.0.1:{}", echo.port())],
    );
    let agent_admin = free_port();
    config.admin_listen = Some(agent_admin);
    let agent = TestAgent::start(config);
    server
        .wait_for_agent("edge-1", Duration::from_secs(10))
        .await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    // The test PKI issues one-day certificates.
    let within_a_day = |t: f64| t > now && t <= now + 86_400.0 + 60.0;
    let page = server.metrics().await;
    for series in [
        "edge_tunnel_certificate_expiry_timestamp_seconds",
        "edge_tunnel_agent_certificate_expiry_min_timestamp_seconds",
    ] {
        let t = metric_in(&page, series);
        assert!(within_a_day(t), "{series} = {t} (now {now})");
    }
    let (_, agents) = e2e::http_get(server.addrs.admin.unwrap(), "/v1/agents").await;
    let listed: serde_json::Value = serde_json::from_str(&agents).unwrap();
    let not_after = listed[0]["not_after"].as_str().unwrap_or_default();
    assert!(
        not_after.ends_with('Z') && not_after.len() >= 20,
        "{agents}"
    );
    assert!(listed[0]["remote_address"].is_null(), "{agents}");
    let (_, agent_page) = e2e::http_get(agent_admin, "/metrics").await;
    let t = metric_in(
        &agent_page,
        "edge_tunnel_agent_certificate_expiry_timestamp_seconds",
    );
    assert!(within_a_day(t), "{t} in\n{agent_page}");
    agent.stop().await;
}
