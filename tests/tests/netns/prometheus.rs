//! A real Prometheus in `cloud` scrapes a real node-exporter at the edge
//! address through the tunnel: through the DNAT rules, and through the
//! CONNECT ingress as its `proxy_url` with credentials (node-exporter over
//! plain HTTP, forwarded; the kubelet-like over HTTPS, tunneled).

use std::time::{Duration, Instant};

use e2e::netns::probe::curl;
use e2e::netns::tunnel::{Edge, CONNECT, PROXY_TOKEN};
use e2e::netns::{self, EDGE_IP};

#[test]
fn prometheus_scrapes_node_exporter_through_the_tunnel_quic() {
    prometheus_scrapes_node_exporter_through_the_tunnel("quic")
}

#[test]
fn prometheus_scrapes_node_exporter_through_the_tunnel_h2() {
    prometheus_scrapes_node_exporter_through_the_tunnel("h2")
}

fn prometheus_scrapes_node_exporter_through_the_tunnel(transport: &str) {
    if !netns::have_tools(&["prometheus", "prometheus-node-exporter"]) {
        return;
    }
    let Some(edge) = Edge::start(&["--transport", transport]) else {
        return;
    };
    let dir = &edge.topo.dir;
    let _exporter = edge.topo.edge.spawn(
        "prometheus-node-exporter",
        &[
            &format!("--web.listen-address={EDGE_IP}:9100"),
            "--collector.disable-defaults",
            "--collector.uname",
            "--collector.loadavg",
        ],
        &dir.join("node-exporter.log"),
    );
    let config = dir.join("prometheus.yml");
    let proxy = format!("http://prometheus:{PROXY_TOKEN}@{CONNECT}");
    let ca = edge.certs.kubelet_dir.join("ca.crt");
    let lines = [
        "global:".to_owned(),
        "  scrape_interval: 1s".into(),
        "  scrape_timeout: 900ms".into(),
        "  evaluation_interval: 1s".into(),
        "scrape_configs:".into(),
        // Through the DNAT rules.
        "  - job_name: edge".into(),
        "    static_configs:".into(),
        format!("      - targets: ['{EDGE_IP}:9100']"),
        // Through the CONNECT ingress: plain HTTP is forwarded ...
        "  - job_name: proxied-http".into(),
        format!("    proxy_url: {proxy}"),
        "    static_configs:".into(),
        "      - targets: ['edge-1:9100']".into(),
        // ... HTTPS is tunneled, the kubelet's own certificate verified.
        "  - job_name: proxied-https".into(),
        "    scheme: https".into(),
        format!("    proxy_url: {proxy}"),
        "    tls_config:".into(),
        format!("      ca_file: {}", ca.display()),
        "    static_configs:".into(),
        "      - targets: ['edge-1:10250']".into(),
        // A wrong token gets nothing.
        "  - job_name: wrong-token".into(),
        format!("    proxy_url: http://prometheus:not-the-token-at-all@{CONNECT}"),
        "    static_configs:".into(),
        "      - targets: ['edge-1:9100']".into(),
    ];
    std::fs::write(&config, lines.join("\n") + "\n").unwrap();
    let prometheus = edge.topo.cloud.spawn(
        "prometheus",
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            "--web.listen-address=127.0.0.1:9090",
        ],
        &dir.join("prometheus.log"),
    );
    let query = |q: &str| {
        curl(
            &edge.topo.cloud,
            &[
                "-G",
                "http://127.0.0.1:9090/api/v1/query",
                "--data-urlencode",
                &format!("query={q}"),
            ],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = query("up{job=\"edge\"}");
        let uname = query("node_uname_info{job=\"proxied-http\"}");
        let https = query("kubelet_like_up{job=\"proxied-https\"}");
        let proxied = query("up{job=~\"proxied-.*\"}");
        let wrong = query("up{job=\"wrong-token\"}");
        let is_up = |r: &str| r.contains("\"value\":[") && r.contains(",\"1\"]");
        let all_up = |r: &str| is_up(r) && !r.contains(",\"0\"]");
        if is_up(&up)
            && uname.contains("\"nodename\"")
            && is_up(&https)
            && all_up(&proxied)
            && wrong.contains(",\"0\"]")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never saw every target\nup: {up}\nuname via proxy: {uname}\n\
             kubelet via proxy: {https}\nproxied up: {proxied}\nwrong token up: {wrong}\n\
             prometheus log:\n{}",
            prometheus.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
