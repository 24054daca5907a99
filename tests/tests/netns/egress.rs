//! kube-apiserver sends its whole `cluster` egress through the selector,
//! webhooks and aggregated APIs in the cloud too: with `--direct-cidr`
//! the ingress dials those itself when no agent serves them (by address,
//! or by a name that resolves into the range), and keeps the fast 503 for
//! everything else.

use std::net::SocketAddr;

use e2e::netns::probe::{curl, listening};
use e2e::netns::tunnel::{Edge, ADMIN, CONNECT, DIRECT_IP, PROXY_TOKEN};
use e2e::netns::{CLOUD_IP, CLOUD_WORKER_SIDE_IP};

#[test]
fn the_ingress_dials_cloud_services_in_direct_cidr_itself() {
    let Some(mut edge) = Edge::start(&[]) else {
        return;
    };
    // The service in a pod of its own (the worker), as a webhook is.
    edge.topo.add_worker();
    let topo = &edge.topo;
    let worker = topo.worker.as_ref().expect("added");
    let www = topo.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the cloud\n").unwrap();
    // The same service inside the range, outside it, and on the server's
    // own address inside it.
    let mut web = Vec::new();
    for (ns, ip) in [
        (worker, DIRECT_IP),
        (&topo.cloud, CLOUD_IP),
        (&topo.cloud, CLOUD_WORKER_SIDE_IP),
    ] {
        web.push(ns.spawn(
            "python3",
            &[
                "-m",
                "http.server",
                "--bind",
                ip,
                "8000",
                "--directory",
                www.to_str().unwrap(),
            ],
            &topo.dir.join(format!("web-{ip}.log")),
        ));
        let addr: SocketAddr = format!("{ip}:8000").parse().unwrap();
        assert!(listening(ns, addr), "web server on {addr}");
    }
    let proxy = format!("http://prometheus:{PROXY_TOKEN}@{CONNECT}");
    let through = |extra: &[&str], url: &str| {
        let mut args = vec!["-x", &proxy, "-w", "\n%{http_code}"];
        args.extend_from_slice(extra);
        args.push(url);
        curl(&topo.cloud, &args)
    };
    // A forwarded request by name (resolved by the server), a CONNECT by
    // address.
    let by_name = through(&[], "http://webhook.default.svc:8000/hello.txt");
    assert_eq!(
        by_name,
        "hello from the cloud\n\n200",
        "{}",
        edge.server.log_text()
    );
    let by_address = through(&["-p"], &format!("http://{DIRECT_IP}:8000/hello.txt"));
    assert_eq!(by_address, "hello from the cloud\n\n200");
    // Outside the range: not dialed (503, not the target's answer), though
    // the same server listens there.
    let outside = through(&[], &format!("http://{CLOUD_IP}:8000/hello.txt"));
    assert!(outside.ends_with("\n503"), "{outside}");
    assert!(outside.contains("not in --direct-cidr"), "{outside}");
    // The server's own loopback is never dialed, whatever the ranges, nor
    // an address of its own interfaces that the range holds (where a pod's
    // admin port listens).
    let admin = through(&[], &format!("http://{ADMIN}/metrics"));
    assert!(admin.ends_with("\n503"), "{admin}");
    let own = through(
        &[],
        &format!("http://{CLOUD_WORKER_SIDE_IP}:8000/hello.txt"),
    );
    assert!(own.ends_with("\n503"), "{own}");
    assert!(own.contains("the server's own"), "{own}");
    // Edge nodes still go through their agent.
    let metrics = curl(&topo.cloud, &[&format!("http://{ADMIN}/metrics")]);
    assert_eq!(
        e2e::metric_in(&metrics, "edge_tunnel_direct_dials_total{result=\"ok\"}"),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        e2e::metric_in(
            &metrics,
            "edge_tunnel_direct_dials_total{result=\"no_agent\"}"
        ),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        e2e::metric_in(
            &metrics,
            "edge_tunnel_streams_total{ingress=\"forward_direct\"}"
        ),
        1.0
    );
    assert_eq!(
        e2e::metric_in(&metrics, "edge_tunnel_streams_total{ingress=\"direct\"}"),
        1.0
    );
}
