//! The DNAT helper against the kernel: refusal without CAP_NET_ADMIN,
//! cleanup after a crash, the standalone helper following a server, and
//! the conntrack flush that must spare translated connections.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::netns::probe::{curl, listening};
use e2e::netns::tunnel::{
    certs, edge_ip, spawn_kubelet, start_agent, start_server, Edge, ADMIN, ECHO_PORT,
};
use e2e::netns::{self, bin, Topology, CLOUD_IP, EDGE_IP};
use e2e::targets;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

#[test]
fn standalone_dnat_helper_follows_the_servers_agents() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    let kubelet = spawn_kubelet(&topo, &certs);
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
        kubelet,
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
