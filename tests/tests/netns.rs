//! End-to-end tests across a real NAT (network namespaces), with the real
//! binaries: tunnel-server with its DNAT helper in `cloud`, tunnel-agent
//! behind the NAT in `edge`. Need root; under CI=true a missing capability
//! fails instead of skipping.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use certs::files;
use e2e::netns::{self, bin, Proc, Topology, CLOUD_IP, EDGE_IP};
use e2e::targets::{self, hex, pattern};
use e2e::Pki;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const ADMIN: &str = "127.0.0.1:9091";
const ECHO_PORT: u16 = 7000;
/// The agent's admin endpoint, inside the edge namespace.
const AGENT_ADMIN: &str = "127.0.0.1:9093";

fn edge_ip() -> IpAddr {
    EDGE_IP.parse().unwrap()
}

/// Certificates: the tunnel's PKI and a separate CA for the kubelet.
struct Certs {
    pki: Pki,
    kubelet_dir: PathBuf,
    kubelet_roots: rustls::RootCertStore,
}

fn certs() -> Certs {
    let pki = Pki::with_server_ips(&[CLOUD_IP.parse().unwrap()]);
    pki.issue_agent("edge-1", &[edge_ip()]);
    let ca = certs::issue::Ca::generate("kubelet CA", 1).unwrap();
    let leaf = ca
        .issue_server("edge-1", &["edge-1".into()], &[edge_ip()], 1)
        .unwrap();
    let kubelet_dir = pki.dir.path().join("kubelet");
    files::write_leaf_dir(&kubelet_dir, &leaf, &ca.pem().cert, true).unwrap();
    let mut kubelet_roots = rustls::RootCertStore::empty();
    for c in files::read_certs(&kubelet_dir.join("ca.crt")).unwrap() {
        kubelet_roots.add(c).unwrap();
    }
    Certs {
        pki,
        kubelet_dir,
        kubelet_roots,
    }
}

/// The kubelet-like HTTPS server at the edge address, port 10250.
fn spawn_kubelet(topo: &Topology, certs: &Certs) -> Proc {
    topo.edge.spawn(
        env!("CARGO_BIN_EXE_sample-kubelet"),
        &[
            "--listen",
            &format!("{EDGE_IP}:10250"),
            "--cert-dir",
            certs.kubelet_dir.to_str().unwrap(),
        ],
        &topo.dir.join("kubelet.log"),
    )
}

/// The tunnel across the NAT.
pub(crate) struct Edge {
    certs: Certs,
    server: Proc,
    agent: Proc,
    _kubelet: Proc,
    topo: Topology,
}

fn start_server(topo: &Topology, certs: &Certs) -> Proc {
    let server = topo.cloud.spawn(
        bin("tunnel-server").to_str().unwrap(),
        &[
            "--listen",
            &format!("{CLOUD_IP}:8443"),
            "--cert-dir",
            certs.pki.server_dir().to_str().unwrap(),
            "--transparent-listen",
            &format!("{CLOUD_IP}:8081"),
            "--connect-listen",
            "127.0.0.1:8080",
            "--admin-listen",
            ADMIN,
            "--dnat",
            "--dnat-ports",
            &format!("10250,10255,9100,{ECHO_PORT}"),
            // Notice a vanished agent within seconds (the outage test).
            "--keepalive",
            "1",
            "--idle-timeout",
            "3",
        ],
        &topo.dir.join("server.log"),
    );
    wait_until(
        &topo.cloud,
        Duration::from_secs(10),
        "server ready",
        || curl_ok(&topo.cloud, &format!("http://{ADMIN}/readyz")),
        &server,
    );
    server
}

fn start_agent(topo: &Topology, certs: &Certs, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--server".to_owned(),
        format!("{CLOUD_IP}:8443"),
        "--cert-dir".to_owned(),
        certs.pki.agent_dir("edge-1").to_str().unwrap().to_owned(),
        "--node-name".to_owned(),
        "edge-1".to_owned(),
        "--allow".to_owned(),
        format!("{EDGE_IP}:10250,9100,{ECHO_PORT}"),
        "--admin-listen".to_owned(),
        AGENT_ADMIN.to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    topo.edge.spawn(
        bin("tunnel-agent").to_str().unwrap(),
        &args,
        &topo.dir.join("agent.log"),
    )
}

impl Edge {
    fn start(agent_args: &[&str]) -> Option<Edge> {
        if !netns::available() {
            return None;
        }
        let topo = Topology::new();
        let certs = certs();
        let kubelet = spawn_kubelet(&topo, &certs);
        assert!(
            listening(&topo.edge, SocketAddr::new(edge_ip(), 10250)),
            "kubelet-like never listened"
        );
        let server = start_server(&topo, &certs);
        let agent = start_agent(&topo, &certs, agent_args);
        let edge = Edge {
            certs,
            server,
            agent,
            _kubelet: kubelet,
            topo,
        };
        edge.wait_registered(Duration::from_secs(15));
        Some(edge)
    }

    fn wait_registered(&self, within: Duration) {
        let cloud = &self.topo.cloud;
        let deadline = Instant::now() + within;
        loop {
            let agents = curl(cloud, &[&format!("http://{ADMIN}/v1/agents")]);
            let rules = String::from_utf8_lossy(&cloud.sh(&["iptables-save", "-t", "nat"]).stdout)
                .into_owned();
            if agents.contains("\"edge-1\"")
                && rules.contains(&format!("-A TUNNEL-DNAT -d {EDGE_IP}/32"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not registered with DNAT rules within {within:?}\nagents: {agents}\nrules:\n{rules}\nserver log:\n{}\nagent log:\n{}",
                self.server.log_text(),
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits (up to 5 s) until something accepts connections on `addr` in `ns`.
fn listening(ns: &netns::Ns, addr: SocketAddr) -> bool {
    ns.block_on(|| async move {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    })
}

fn curl(ns: &netns::Ns, args: &[&str]) -> String {
    curl_with_errors(ns, args).0
}

/// curl's output and, when it failed, what it said on stderr.
fn curl_with_errors(ns: &netns::Ns, args: &[&str]) -> (String, String) {
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn curl_ok(ns: &netns::Ns, url: &str) -> bool {
    ns.command("curl")
        .args(["-fsS", "--max-time", "2", "-o", "/dev/null", url])
        .status()
        .unwrap()
        .success()
}

fn wait_until(
    ns: &netns::Ns,
    within: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    proc_: &Proc,
) {
    let _ = ns;
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}; log:\n{}",
            proc_.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_nat_is_real_without_the_tunnel() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    let _kubelet = spawn_kubelet(&topo, &certs);
    // The kubelet is up (reachable inside the edge)...
    let edge_view = topo.edge.block_on(|| async {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect((EDGE_IP, 10250))
                .await
                .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    assert!(
        edge_view,
        "the kubelet-like server never listened in the edge"
    );
    // ...but the cloud cannot open a connection to it through the NAT.
    let cloud_view = topo.cloud.block_on(|| async {
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((EDGE_IP, 10250)),
        )
        .await
    });
    assert!(
        !matches!(cloud_view, Ok(Ok(_))),
        "cloud reached the edge directly: {cloud_view:?}"
    );
}

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

#[test]
fn prometheus_scrapes_node_exporter_through_the_tunnel_quic() {
    prometheus_scrapes_node_exporter_through_the_tunnel("quic")
}

#[test]
fn prometheus_scrapes_node_exporter_through_the_tunnel_h2() {
    prometheus_scrapes_node_exporter_through_the_tunnel("h2")
}

fn prometheus_scrapes_node_exporter_through_the_tunnel(transport: &str) {
    for tool in ["prometheus", "prometheus-node-exporter"] {
        if !netns::on_path(tool) {
            let msg = format!("{tool} is not installed (Debian package {tool})");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            return;
        }
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
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: edge\n    static_configs:\n      - targets: ['{EDGE_IP}:9100']\n"
        ),
    )
    .unwrap();
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
        let uname = query("node_uname_info");
        if up.contains("\"value\":[") && up.contains(",\"1\"]") && uname.contains("\"nodename\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never saw the exporter\nup: {up}\nuname: {uname}\nprometheus log:\n{}",
            prometheus.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

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

#[test]
fn dnat_without_net_admin_fails_with_a_clear_message() {
    if !netns::available() || !netns::on_path("setpriv") {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    let out = topo
        .cloud
        .command("setpriv")
        .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"])
        .arg(bin("tunnel-server"))
        .args(["--listen", &format!("{CLOUD_IP}:8443"), "--cert-dir"])
        .arg(certs.pki.server_dir())
        .args([
            "--transparent-listen",
            &format!("{CLOUD_IP}:8081"),
            "--dnat",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
}

#[test]
fn dnat_cleanup_removes_rules_left_by_a_crash() {
    let Some(mut edge) = Edge::start(&[]) else {
        return;
    };
    let cloud = &edge.topo.cloud;
    // A crash: no chance to clean up.
    let pid = edge.server.pid();
    netns::sh(&["kill", "-KILL", &pid.to_string()]);
    std::thread::sleep(Duration::from_millis(200));
    let rules =
        String::from_utf8_lossy(&cloud.sh(&["iptables-save", "-t", "nat"]).stdout).into_owned();
    assert!(rules.contains("TUNNEL-DNAT"));
    let out = cloud
        .command(bin("tunnel-server").to_str().unwrap())
        .args(["dnat", "--cleanup"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = String::from_utf8_lossy(&cloud.sh(&["iptables-save"]).stdout).into_owned();
    assert!(!rules.contains("TUNNEL-DNAT"), "{rules}");
    // And a restart never duplicates rules. The restarted server has the
    // same key, so its stateless reset ends the agent's old connection at
    // the next keep-alive (10 s) instead of the idle timeout.
    edge.server = start_server(&edge.topo, &edge.certs);
    edge.wait_registered(Duration::from_secs(25));
    let rules =
        String::from_utf8_lossy(&cloud.sh(&["iptables-save", "-t", "nat"]).stdout).into_owned();
    assert_eq!(rules.matches("-j TUNNEL-DNAT").count(), 2, "{rules}");
}

fn agent_transport(edge: &Edge) -> Option<String> {
    let agents = curl(&edge.topo.cloud, &[&format!("http://{ADMIN}/v1/agents")]);
    let v: serde_json::Value = serde_json::from_str(&agents).ok()?;
    v.get(0)?.get("transport")?.as_str().map(str::to_owned)
}

fn block_udp(topo: &Topology, on: bool) {
    let op = if on { "-I" } else { "-D" };
    let mut args = vec!["iptables", op, "FORWARD"];
    if on {
        args.push("1");
    }
    args.extend([
        "-p",
        "udp",
        "-j",
        "DROP",
        "-m",
        "comment",
        "--comment",
        "edge-tunnel-test-no-udp",
    ]);
    topo.router.sh(&args);
}

#[test]
fn auto_falls_back_to_h2_without_udp_and_returns_to_quic() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    block_udp(&topo, true);
    let _kubelet = spawn_kubelet(&topo, &certs);
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
        _kubelet,
        topo,
    };
    // Serving over HTTP/2 within 10 s of start.
    edge.wait_registered(Duration::from_secs(10));
    assert_eq!(agent_transport(&edge).as_deref(), Some("h2"));
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
    block_udp(&edge.topo, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent_transport(&edge).as_deref() != Some("quic") {
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
    block_udp(&topo, true);
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

#[test]
fn standalone_dnat_helper_follows_the_servers_agents() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    let _kubelet = spawn_kubelet(&topo, &certs);
    assert!(listening(&topo.edge, SocketAddr::new(edge_ip(), 10250)));
    // A server without --dnat, and the helper on its own, following it.
    let server = topo.cloud.spawn(
        bin("tunnel-server").to_str().unwrap(),
        &[
            "--listen",
            &format!("{CLOUD_IP}:8443"),
            "--cert-dir",
            certs.pki.server_dir().to_str().unwrap(),
            "--transparent-listen",
            &format!("{CLOUD_IP}:8081"),
            "--admin-listen",
            ADMIN,
        ],
        &topo.dir.join("server.log"),
    );
    let mut helper = topo.cloud.spawn(
        bin("tunnel-server").to_str().unwrap(),
        &[
            "dnat",
            "--server-admin",
            &format!("http://{ADMIN}"),
            "--to",
            &format!("{CLOUD_IP}:8081"),
            "--poll",
            "1",
        ],
        &topo.dir.join("dnat.log"),
    );
    let agent = start_agent(&topo, &certs, &[]);
    let edge = Edge {
        certs,
        server,
        agent,
        _kubelet,
        topo,
    };
    // wait_registered also waits for the helper's rule for the agent's address.
    edge.wait_registered(Duration::from_secs(20));
    let cacert = edge.certs.kubelet_dir.join("ca.crt");
    let body = curl(
        &edge.topo.cloud,
        &[
            "--cacert",
            cacert.to_str().unwrap(),
            &format!("https://{EDGE_IP}:10250/healthz"),
        ],
    );
    assert_eq!(
        body,
        "ok from kubelet-like\n",
        "helper log:\n{}",
        helper.log_text()
    );
    let status = helper.terminate();
    assert!(status.success(), "{}", helper.log_text());
    let rules =
        String::from_utf8_lossy(&edge.topo.cloud.sh(&["iptables-save"]).stdout).into_owned();
    assert!(!rules.contains("TUNNEL-DNAT"), "left behind:\n{rules}");
}

/// The conntrack flush that follows a new DNAT rule must delete only the
/// entries that bypassed the rule, never a connection the rule already
/// translated. Flushing every entry for the destination used to reset
/// about one request in fifteen made within milliseconds of an agent
/// registering (the reset reached the server; curl hung until its
/// timeout). Checked against the kernel's conntrack, not a model of it.
#[test]
fn conntrack_flush_keeps_connections_the_new_rule_translated() {
    let Some(edge) = Edge::start(&[]) else {
        return;
    };
    let _echo = edge.topo.edge.spawn_task(|| async {
        targets::echo_server_on(SocketAddr::new(edge_ip(), ECHO_PORT)).await;
    });
    // A port with no rule: the SYN is not translated and the router drops
    // it, so its entry stays (SYN_SENT) with the edge address as reply
    // source, like a connection tried before its rule existed.
    const NO_RULE_PORT: u16 = 12345;
    let entries = |port: u16| {
        let out =
            edge.topo
                .cloud
                .sh(&["conntrack", "-L", "-p", "tcp", "--dport", &port.to_string()]);
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let stale = |port: u16| tunnel_server::dnat::rules::Stale {
        dst: format!("{EDGE_IP}/32"),
        port,
        reply_src: EDGE_IP.to_owned(),
    };
    edge.topo.cloud.block_on(|| async {
        let mut tcp = tokio::net::TcpStream::connect((EDGE_IP, ECHO_PORT))
            .await
            .expect("connect through the tunnel");
        let mut buf = [0u8; 3];
        tcp.write_all(b"one").await.unwrap();
        tcp.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"one");
        let bypass = tokio::spawn(tokio::net::TcpStream::connect((EDGE_IP, NO_RULE_PORT)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            entries(NO_RULE_PORT),
            1,
            "the untranslated SYN has an entry"
        );
        // Close the connecting socket, so no SYN retransmission (the first
        // after 1 s) makes a new entry after the flush.
        bypass.abort();
        let _ = bypass.await;

        tunnel_server::dnat::iptables::flush_conntrack(&stale(NO_RULE_PORT)).await;
        tunnel_server::dnat::iptables::flush_conntrack(&stale(ECHO_PORT)).await;

        assert_eq!(
            entries(NO_RULE_PORT),
            0,
            "the untranslated entry was flushed"
        );
        assert_eq!(entries(ECHO_PORT), 1, "the translated entry was kept");
        tcp.write_all(b"two").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf))
            .await
            .expect("the translated connection still answers")
            .expect("the translated connection was not reset");
        assert_eq!(&buf, b"two");
    });
}
