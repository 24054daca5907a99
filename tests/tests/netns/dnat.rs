//! The DNAT helper against the kernel: refusal without CAP_NET_ADMIN,
//! cleanup after a crash, the standalone helper following a server's TLS
//! feed (and refusing a server of another CA), jumps that match only the
//! redirected TCP ports (replacing the old unmatched ones), and the
//! conntrack flushes: sparing translated connections, deleting those of a
//! removed range.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::netns::probe::{curl, listening, wait_until};
use e2e::netns::tunnel::{
    certs, edge_ip, spawn_kubelet, start_agent, start_server, Certs, Edge, ADMIN, ECHO_PORT,
};
use e2e::netns::{self, bin, Ns, Proc, Topology, CLOUD_IP, EDGE_IP};
use e2e::targets;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_server::dnat::conntrack::Conntrack;
use tunnel_server::dnat::metrics::DnatMetrics;
use tunnel_server::dnat::reconciler::{Dnat, DnatConfig};
use tunnel_server::dnat::rules::{Stale, StaleKind};

/// The server's agent feed (`--feed-listen`), inside the cloud namespace.
const FEED: &str = "198.18.0.1:9443";
/// The standalone helper's admin endpoint, inside the cloud namespace.
const HELPER_ADMIN: &str = "127.0.0.1:9095";

/// A server in `cloud` without --dnat, serving the agent feed, with the
/// certificates of `certs`.
fn start_feed_server(topo: &Topology, certs: &Certs) -> Proc {
    topo.cloud.spawn(
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
            "--feed-listen",
            FEED,
        ],
        &topo.dir.join("server.log"),
    )
}

/// The standalone helper in `cloud`, following the feed with the DNAT
/// helper certificate of `certs`.
fn start_helper(topo: &Topology, certs: &Certs) -> Proc {
    let helper_dir = certs.pki.issue_dnat_helper();
    topo.cloud.spawn(
        bin("tunnel-server").to_str().unwrap(),
        &[
            "dnat",
            "--server-feed",
            &format!("https://{FEED}"),
            "--cert-dir",
            helper_dir.to_str().unwrap(),
            "--to",
            &format!("{CLOUD_IP}:8081"),
            "--poll",
            "1",
            "--admin-listen",
            HELPER_ADMIN,
        ],
        &topo.dir.join("dnat.log"),
    )
}

/// A counter of the helper's `/metrics`, 0 when absent.
fn helper_metric(cloud: &Ns, series: &str) -> f64 {
    curl(cloud, &[&format!("http://{HELPER_ADMIN}/metrics")])
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn nat_rules(ns: &Ns) -> String {
    String::from_utf8_lossy(&ns.sh(&["iptables-save", "-t", "nat"]).stdout).into_owned()
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

#[test]
fn standalone_dnat_helper_follows_the_servers_agents() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    // Plain HTTP is refused before any rule is written, naming the flag.
    let out = topo
        .cloud
        .command(bin("tunnel-server").to_str().unwrap())
        .args(["dnat", "--server-feed", &format!("http://{ADMIN}")])
        .args([
            "--cert-dir",
            "/nonexistent",
            "--to",
            &format!("{CLOUD_IP}:8081"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--server-feed") && stderr.contains("plain http:// is refused"),
        "{stderr}"
    );
    assert!(!nat_rules(&topo.cloud).contains("TUNNEL-DNAT"));

    let kubelet = spawn_kubelet(&topo, &certs);
    assert!(listening(&topo.edge, SocketAddr::new(edge_ip(), 10250)));
    // A server without --dnat, and the helper on its own, following its
    // feed over TLS.
    let server = start_feed_server(&topo, &certs);
    let mut helper = start_helper(&topo, &certs);
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
    let cloud = &edge.topo.cloud;
    assert!(helper_metric(cloud, "edge_tunnel_dnat_feed_reads_total{result=\"ok\"}") >= 1.0);
    let server_metrics = curl(cloud, &[&format!("http://{ADMIN}/metrics")]);
    assert!(
        server_metrics.contains("edge_tunnel_feed_requests_total{result=\"ok\"}"),
        "{server_metrics}"
    );
    let status = helper.terminate();
    assert!(status.success(), "{}", helper.log_text());
    let rules = String::from_utf8_lossy(&cloud.sh(&["iptables-save"]).stdout).into_owned();
    assert!(!rules.contains("TUNNEL-DNAT"), "left behind:\n{rules}");
}

/// A feed from a server whose certificate another CA issued is refused:
/// its agents get no rule, and the refusal is counted and logged. (Over
/// the plain-HTTP feed this helper once read, any server, or anyone on
/// the path, chose the DNAT rules.)
#[test]
fn standalone_dnat_helper_refuses_a_server_of_another_ca() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let certs = certs();
    // Another tunnel (its own CA) with an agent for the edge address.
    let rogue = e2e::netns::tunnel::certs();
    let server = start_feed_server(&topo, &rogue);
    let agent = start_agent(&topo, &rogue, &[]);
    wait_until(
        Duration::from_secs(15),
        "agent registered with the other server",
        || curl(&topo.cloud, &[&format!("http://{ADMIN}/v1/agents")]).contains("\"edge-1\""),
        &server,
    );
    let helper = start_helper(&topo, &certs);
    let reason = "edge_tunnel_dnat_feed_reads_total{result=\"server_certificate\"}";
    wait_until(
        Duration::from_secs(10),
        "three refused reads",
        || helper_metric(&topo.cloud, reason) >= 3.0,
        &helper,
    );
    let rules = nat_rules(&topo.cloud);
    assert!(
        !rules.contains(EDGE_IP),
        "a rule from an untrusted feed:\n{rules}"
    );
    let log = helper.log_text();
    assert!(
        log.contains("the server's certificate is not trusted"),
        "{log}"
    );
    assert!(log.contains("--server-ca"), "{log}");
    assert_eq!(
        helper_metric(
            &topo.cloud,
            "edge_tunnel_dnat_feed_reads_total{result=\"ok\"}"
        ),
        0.0
    );
    // The server saw handshakes fail (the helper's alert).
    wait_until(
        Duration::from_secs(5),
        "the server counted the failed handshakes",
        || {
            curl(&topo.cloud, &[&format!("http://{ADMIN}/metrics")])
                .contains("edge_tunnel_feed_requests_total{result=\"tls_failed\"}")
        },
        &server,
    );
    drop(agent);
}

/// The jumps into the chain match TCP to the redirected ports only, and
/// jumps of the old format (no match at all) are replaced on start and
/// removed on cleanup.
#[test]
fn dnat_jumps_match_only_the_redirected_ports() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let cloud = &topo.cloud;
    // What an older version left: the chain and unmatched jumps.
    cloud.sh(&["iptables", "-t", "nat", "-N", "TUNNEL-DNAT"]);
    for from in ["OUTPUT", "PREROUTING"] {
        cloud.sh(&[
            "iptables",
            "-t",
            "nat",
            "-I",
            from,
            "1",
            "-j",
            "TUNNEL-DNAT",
        ]);
    }
    let to: SocketAddr = format!("{CLOUD_IP}:8081").parse().unwrap();
    cloud.block_on(|| async {
        let config = DnatConfig::try_new(to, vec![10255, 10250], vec![]).unwrap();
        let dnat = Dnat::start(config, DnatMetrics::default()).await.unwrap();
        assert!(dnat.sync(&[edge_ip()]).await.unwrap());
        let rules = nat_rules(cloud);
        let jumps: Vec<&str> = rules
            .lines()
            .filter(|l| l.ends_with("-j TUNNEL-DNAT"))
            .collect();
        assert_eq!(
            jumps,
            [
                "-A PREROUTING -p tcp -m multiport --dports 10250,10255 -j TUNNEL-DNAT",
                "-A OUTPUT -p tcp -m multiport --dports 10250,10255 -j TUNNEL-DNAT",
            ],
            "{rules}"
        );
        // In sync now: a second sync changes nothing.
        assert!(!dnat.sync(&[edge_ip()]).await.unwrap());
        // Old jumps left again (a downgrade, a hand edit) go at cleanup.
        cloud.sh(&[
            "iptables",
            "-t",
            "nat",
            "-I",
            "OUTPUT",
            "1",
            "-j",
            "TUNNEL-DNAT",
        ]);
        dnat.cleanup().await.unwrap();
    });
    let rules = String::from_utf8_lossy(&cloud.sh(&["iptables-save"]).stdout).into_owned();
    assert!(!rules.contains("TUNNEL-DNAT"), "left behind:\n{rules}");
}

/// A connection NATed under a `--dnat-cidr` that a restart no longer has
/// loses its conntrack entry when the new process removes the stale rule
/// (before, ranges were never flushed: the entry kept steering the flow
/// to the old target). Untranslated entries of a range that appears are
/// deleted too; the translated ones of the same range are kept.
#[test]
fn conntrack_entries_of_a_removed_range_are_flushed() {
    if !netns::available() {
        return;
    }
    let topo = Topology::new();
    let cloud = &topo.cloud;
    // A range of the edge subnet without hosts: a SYN to it is NATed to
    // our holder, or (without a rule) dropped by the NAT router.
    const RANGE: &str = "198.18.1.128/25";
    const IN_RANGE: &str = "198.18.1.200";
    const PORT: u16 = 10250;
    let entries = |reply_src: Option<&str>| {
        let mut args = vec![
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--orig-dst",
            RANGE,
            "--dport",
            "10250",
        ];
        if let Some(src) = reply_src {
            args.extend(["--reply-src", src]);
        }
        let out = cloud.command(args[0]).args(&args[1..]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    // Someone else's DNAT rule (kube-proxy's on a real host): with NAT in
    // use the namespace tracks connections before our rules exist.
    cloud.sh(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.1/32",
        "-p",
        "tcp",
        "-j",
        "DNAT",
        "--to-destination",
        "192.0.2.2",
    ]);
    let to: SocketAddr = format!("{CLOUD_IP}:8082").parse().unwrap();
    cloud.block_on(|| async {
        // Where the rules point: accepts and holds every connection.
        let holder = tokio::net::TcpListener::bind(to).await.unwrap();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = holder.accept().await {
                held.push(tcp);
            }
        });
        // Before the range is redirected: an untranslated SYN.
        let bypass = tokio::spawn(tokio::net::TcpStream::connect((IN_RANGE, PORT)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        bypass.abort();
        let _ = bypass.await;
        assert_eq!(
            entries(Some(IN_RANGE)),
            1,
            "the untranslated SYN has an entry"
        );

        let metrics = DnatMetrics::default();
        let with_range = DnatConfig::try_new(to, vec![PORT], vec![RANGE.parse().unwrap()]).unwrap();
        let first = Dnat::start(with_range, metrics.clone()).await.unwrap();
        first.sync(&[]).await.unwrap();
        assert_eq!(
            entries(Some(IN_RANGE)),
            0,
            "the untranslated entry was deleted"
        );
        // A connection through the range's rule; it stays established.
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((IN_RANGE, PORT)),
        )
        .await
        .expect("connect through the range's rule")
        .unwrap();
        assert_eq!(entries(Some(CLOUD_IP)), 1, "{}", nat_rules(cloud));
        // A crash, or --keep-rules: the rules stay. The next process has
        // no --dnat-cidr: it removes the stale rule and must flush.
        drop(first);
        let without = DnatConfig::try_new(to, vec![PORT], vec![]).unwrap();
        let second = Dnat::start(without, metrics.clone()).await.unwrap();
        assert!(second.sync(&[]).await.unwrap());
        assert!(!nat_rules(cloud).contains(RANGE));
        let listing = String::from_utf8_lossy(
            &cloud
                .command("conntrack")
                .args(["-L", "-p", "tcp", "--orig-dst", RANGE])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        assert_eq!(
            entries(None),
            0,
            "entries of the removed range are left:\n{listing}"
        );
        assert_eq!(
            metrics
                .conntrack_flushes
                .get_or_create(&[("result", "deleted")])
                .get(),
            2,
            "one flush at the range's arrival, one at its removal"
        );
        assert_eq!(metrics.conntrack_entries_deleted.get(), 2);
        second.cleanup().await.unwrap();
        drop(tcp);
        held.abort();
    });
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
    let stale = |port: u16| Stale {
        dst: format!("{EDGE_IP}/32").parse().unwrap(),
        port,
        kind: StaleKind::NotNated,
    };
    let conntrack = Conntrack::new(DnatMetrics::default());
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

        conntrack.flush(&stale(NO_RULE_PORT)).await;
        conntrack.flush(&stale(ECHO_PORT)).await;

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
