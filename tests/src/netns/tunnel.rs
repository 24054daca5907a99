//! The tunnel across the NAT, as the network-namespace tests run it: the
//! real tunnel-server with its DNAT helper in `cloud`, the real
//! tunnel-agent and a kubelet-like HTTPS server (`sample-kubelet`) in
//! `edge`, and the certificates they use.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use certs::files;

use super::probe::{curl, curl_ok, listening, wait_until};
use super::{available, bin, Proc, Topology, CLOUD_IP, EDGE_IP};
use crate::Pki;

/// The server's admin endpoint, inside the cloud namespace.
pub const ADMIN: &str = "127.0.0.1:9091";
/// An edge port the server redirects and the agent allows (for echo servers).
pub const ECHO_PORT: u16 = 7000;
/// The agent's admin endpoint, inside the edge namespace.
pub const AGENT_ADMIN: &str = "127.0.0.1:9093";
/// The server's CONNECT ingress, in `cloud`.
pub const CONNECT: &str = "127.0.0.1:8080";
/// The cloud range the server dials itself (`--direct-cidr`): its
/// services (webhooks, aggregated APIs) that no agent serves.
/// It holds the worker namespace's address and the cloud's own address
/// towards it (the server's, which it never dials).
pub const DIRECT_CIDR: &str = "198.18.2.0/28";
/// A cloud service address inside [`DIRECT_CIDR`] (the worker's,
/// [`super::Topology::add_worker`]), which the cloud's `/etc/hosts` calls
/// `webhook.default.svc`.
pub const DIRECT_IP: &str = super::WORKER_IP;
/// The proxy token of the name `prometheus` (`--connect-token-file`).
pub const PROXY_TOKEN: &str = "netns-proxy-token-0123456789";

pub fn edge_ip() -> IpAddr {
    EDGE_IP.parse().unwrap()
}

/// Certificates: the tunnel's PKI and a separate CA for the kubelet.
pub struct Certs {
    pub pki: Pki,
    pub kubelet_dir: PathBuf,
    pub kubelet_roots: rustls::RootCertStore,
}

pub fn certs() -> Certs {
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
pub fn spawn_kubelet(topo: &Topology, certs: &Certs) -> Proc {
    topo.edge.spawn(
        bin("sample-kubelet").to_str().unwrap(),
        &[
            "--listen",
            &format!("{EDGE_IP}:10250"),
            "--cert-dir",
            certs.kubelet_dir.to_str().unwrap(),
        ],
        &topo.dir.join("kubelet.log"),
    )
}

/// The server in `cloud` with DNAT for the kubelet, exporter and echo
/// ports; returns once it is ready.
pub fn start_server(topo: &Topology, certs: &Certs) -> Proc {
    start_server_with(topo, certs, &[])
}

/// [`start_server`] with `extra` flags.
pub fn start_server_with(topo: &Topology, certs: &Certs, extra: &[&str]) -> Proc {
    let tokens = topo.dir.join("connect-tokens");
    std::fs::write(&tokens, format!("prometheus:{PROXY_TOKEN}\n")).unwrap();
    // Before the server starts: `ip netns exec` mounts the file at exec.
    topo.cloud
        .set_hosts(&format!("{DIRECT_IP} webhook.default.svc"));
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
            CONNECT,
            "--connect-token-file",
            tokens.to_str().unwrap(),
            "--direct-cidr",
            DIRECT_CIDR,
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
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<&str>>(),
        &topo.dir.join("server.log"),
    );
    wait_until(
        Duration::from_secs(10),
        "server ready",
        || curl_ok(&topo.cloud, &format!("http://{ADMIN}/readyz")),
        &server,
    );
    server
}

/// The agent `edge-1` in `edge`, with `extra` flags.
pub fn start_agent(topo: &Topology, certs: &Certs, extra: &[&str]) -> Proc {
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

/// The tunnel across the NAT.
pub struct Edge {
    pub certs: Certs,
    pub server: Proc,
    pub agent: Proc,
    pub kubelet: Proc,
    pub topo: Topology,
}

impl Edge {
    /// A fresh topology with the kubelet, the server and an agent with
    /// `agent_args`, registered; `None` when the machine cannot build
    /// namespaces (a failure instead under `CI=true`).
    pub fn start(agent_args: &[&str]) -> Option<Edge> {
        if !available() {
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
            kubelet,
            topo,
        };
        edge.wait_registered(Duration::from_secs(15));
        Some(edge)
    }

    /// Waits until the server lists `edge-1` and the DNAT rule for the
    /// edge address is in place.
    pub fn wait_registered(&self, within: Duration) {
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

    /// The transport the server says the agent uses.
    pub fn agent_transport(&self) -> Option<String> {
        let agents = curl(&self.topo.cloud, &[&format!("http://{ADMIN}/v1/agents")]);
        let v: serde_json::Value = serde_json::from_str(&agents).ok()?;
        v.get(0)?.get("transport")?.as_str().map(str::to_owned)
    }
}
