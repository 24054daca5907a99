//! End-to-end tests on loopback: the real server and agent code in-process,
//! real sockets, real QUIC and TLS.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use e2e::targets::{self, echo_digest, hex, pattern};
use e2e::{
    connect_via, eventually, free_port, http_get, init_logging, metric_in, Pki, TestAgent,
    TestServer,
};
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const NODE: &str = "edge-1";

fn localhost() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

struct Tunnel {
    pki: Pki,
    server: TestServer,
    agent: TestAgent,
}

/// A server and one registered agent for `edge-1` (address 127.0.0.1)
/// allowed to reach `ports` on 127.0.0.1.
async fn tunnel(ports: &[u16], tr: Transport) -> Tunnel {
    tunnel_with(&allow(ports), tr, |_| {}).await
}

/// [`tunnel`] with the agent's `--allow` entries (empty: the default from
/// its certificate) and server settings changed by `tune`.
async fn tunnel_with(
    allow: &[String],
    tr: Transport,
    tune: impl FnOnce(&mut tunnel_server::ServerSettings),
) -> Tunnel {
    init_logging();
    let pki = Pki::new();
    pki.issue_agent(NODE, &[localhost()]);
    let mut settings = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
    tune(&mut settings);
    let server = TestServer::start_with(settings).await;
    let agent = TestAgent::start(agent_config(&pki, NODE, &server, allow, tr));
    server.wait_for_agent(NODE, Duration::from_secs(10)).await;
    Tunnel { pki, server, agent }
}

/// The transports every test runs over.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Quic,
    H2,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::H2 => "h2",
        }
    }
}

/// An agent configuration forced onto one transport.
fn agent_config(
    pki: &Pki,
    node: &str,
    server: &TestServer,
    allow: &[String],
    tr: Transport,
) -> tunnel_agent::AgentConfig {
    let mut c = TestAgent::config(pki, node, server.addrs.quic, allow);
    c.transport = match tr {
        Transport::Quic => tunnel_agent::config::TransportChoice::Quic,
        Transport::H2 => tunnel_agent::config::TransportChoice::H2,
    };
    c
}

fn allow(ports: &[u16]) -> Vec<String> {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    vec![format!("127.0.0.1:{}", ports.join(","))]
}

async fn https_through_connect_verifies_the_targets_own_certificate(tr: Transport) {
    let kubelet = targets::kubelet_like(localhost()).await;
    let t = tunnel(&[kubelet.addr.port()], tr).await;
    for host in [
        kubelet.addr.to_string(),
        format!("{NODE}:{}", kubelet.addr.port()),
    ] {
        let tcp = connect_via(t.server.connect_addr(), &host).await.unwrap();
        // The client trusts only the kubelet's CA: TLS is end to end.
        let mut tls = targets::tls_connect(tcp, &kubelet.roots, localhost()).await;
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: kubelet\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        tls.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.ends_with("ok from kubelet-like\n"), "{resp}");
    }
    assert_eq!(
        t.server
            .metric("edge_tunnel_streams_total{ingress=\"connect\"}")
            .await,
        2.0
    );
    t.agent.stop().await;
}

async fn streaming_logs_arrive_as_written(tr: Transport) {
    let kubelet = targets::kubelet_like(localhost()).await;
    let t = tunnel(&[kubelet.addr.port()], tr).await;
    let tcp = connect_via(t.server.connect_addr(), &kubelet.addr.to_string())
        .await
        .unwrap();
    let tls = targets::tls_connect(tcp, &kubelet.roots, localhost()).await;
    let mut r = BufReader::new(tls);
    let sent = Instant::now();
    r.get_mut()
        .write_all(b"GET /logs HTTP/1.1\r\nHost: kubelet\r\n\r\n")
        .await
        .unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut arrivals = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap() == 0 {
            break;
        }
        assert_eq!(line, format!("log line {}\n", arrivals.len()));
        arrivals.push(sent.elapsed());
    }
    assert_eq!(arrivals.len(), 30);
    assert!(
        arrivals[0] < Duration::from_millis(500),
        "first line after {:?}",
        arrivals[0]
    );
    // Lines are written every 100 ms over 3 s; arriving spread out (not in
    // one batch at the end) means the last comes well after the first.
    let spread = arrivals[29] - arrivals[0];
    assert!(
        spread > Duration::from_millis(2000),
        "lines arrived within {spread:?}"
    );
    t.agent.stop().await;
}

async fn websocket_exec_session_echoes(tr: Transport) {
    let kubelet = targets::kubelet_like(localhost()).await;
    let t = tunnel(&[kubelet.addr.port()], tr).await;
    let tcp = connect_via(t.server.connect_addr(), &kubelet.addr.to_string())
        .await
        .unwrap();
    let tls = targets::tls_connect(tcp, &kubelet.roots, localhost()).await;
    let url = format!("wss://{}/exec", kubelet.addr);
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..200 {
        let msg = if i % 2 == 0 {
            WsMessage::text(format!("keystroke {i}"))
        } else {
            WsMessage::binary(pattern(i * 37, i as u64))
        };
        ws.send(msg.clone()).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo, msg);
    }
    ws.close(None).await.unwrap();
    t.agent.stop().await;
}

async fn half_close_still_delivers_the_response(tr: Transport) {
    let target = targets::digest_after_eof_server().await;
    let t = tunnel(&[target.port()], tr).await;
    let mut tcp = connect_via(t.server.connect_addr(), &target.to_string())
        .await
        .unwrap();
    let data = pattern(3 * 1024 * 1024 + 17, 1);
    tcp.write_all(&data).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    let expected = format!(
        "sha256:{} bytes:{}",
        hex(&Sha256::digest(&data)),
        data.len()
    );
    assert_eq!(reply, expected);
    t.agent.stop().await;
}

async fn target_reset_reaches_the_client_as_a_reset(tr: Transport) {
    let target = targets::reset_server().await;
    let t = tunnel(&[target.port()], tr).await;
    let mut tcp = connect_via(t.server.connect_addr(), &target.to_string())
        .await
        .unwrap();
    tcp.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the reset arrives")
        .expect_err("a reset, not EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    t.agent.stop().await;
}

async fn client_reset_reaches_the_target_as_a_reset(tr: Transport) {
    let (target, mut seen) = targets::reset_observer().await;
    let t = tunnel(&[target.port()], tr).await;
    let tcp = connect_via(t.server.connect_addr(), &target.to_string())
        .await
        .unwrap();
    let mut tcp = tcp;
    tcp.write_all(b"hello").await.unwrap();
    tcp.flush().await.unwrap();
    // Give the byte time to cross, then abort the client side.
    tokio::time::sleep(Duration::from_millis(200)).await;
    socket2::SockRef::from(&tcp)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(tcp);
    let kind = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the target sees the end")
        .unwrap();
    assert_eq!(kind, std::io::ErrorKind::ConnectionReset);
    t.agent.stop().await;
}

async fn one_gib_each_way_on_one_connection(tr: Transport) {
    let target = targets::echo_server().await;
    let t = tunnel(&[target.port()], tr).await;
    let tcp = connect_via(t.server.connect_addr(), &target.to_string())
        .await
        .unwrap();
    let (sent, echoed) = echo_digest(tcp, 1 << 30, 42).await;
    assert_eq!(sent, echoed);
    assert!(
        t.server
            .metric("edge_tunnel_relayed_bytes_total{direction=\"to_agent\"}")
            .await
            >= (1u64 << 30) as f64
    );
    t.agent.stop().await;
}

async fn thousand_concurrent_connections_of_256_kib(tr: Transport) {
    let target = targets::echo_server().await;
    let t = tunnel(&[target.port()], tr).await;
    let proxy = t.server.connect_addr();
    let target = target.to_string();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u64 {
        let target = target.clone();
        tasks.spawn(async move {
            let tcp = connect_via(proxy, &target).await.unwrap();
            echo_digest(tcp, 256 * 1024, i).await
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        let (sent, echoed) = r.unwrap();
        assert_eq!(sent, echoed);
        done += 1;
    }
    assert_eq!(done, 1000);
    assert_eq!(
        t.server
            .metric("edge_tunnel_streams_total{ingress=\"connect\"}")
            .await,
        1000.0
    );
    assert_eq!(
        t.server.metric("edge_tunnel_dial_failures_total").await,
        0.0
    );
    t.agent.stop().await;
}

/// The agent grants the server `FIRST_STREAM_LIMIT` streams at first and
/// raises the grant as they fill (quinn allocates state for every stream
/// granted): three times that many held open at once must all get through,
/// none waiting for a grant.
async fn streams_past_the_first_grant_are_open_at_once(tr: Transport) {
    let target = targets::echo_server().await;
    let t = tunnel(&[target.port()], tr).await;
    let proxy = t.server.connect_addr();
    let target = target.to_string();
    let count = 3 * transport::quic::FIRST_STREAM_LIMIT as usize;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let target = target.clone();
        tasks.spawn(async move {
            let mut tcp = connect_via(proxy, &target).await.unwrap();
            let byte = [i as u8];
            tcp.write_all(&byte).await.unwrap();
            let mut back = [0u8];
            tcp.read_exact(&mut back).await.unwrap();
            assert_eq!(back, byte);
            tcp
        });
    }
    let mut open = Vec::with_capacity(count);
    while let Some(tcp) = tasks.join_next().await {
        open.push(tcp.unwrap());
    }
    assert_eq!(
        t.server.metric("edge_tunnel_streams_active").await,
        count as f64,
        "every tunnel is open at once"
    );
    assert_eq!(
        t.server.metric("edge_tunnel_dial_failures_total").await,
        0.0
    );
    drop(open);
    t.agent.stop().await;
}

async fn stalled_readers_do_not_stall_other_streams(tr: Transport) {
    let firehose = targets::firehose_server().await;
    let echo = targets::echo_server().await;
    // Every stalled stream here comes from one client (127.0.0.1): let it
    // borrow the whole budget (the per-client cap has its own test).
    let t = tunnel_with(&allow(&[firehose.port(), echo.port()]), tr, |s| {
        s.receive_budget.per_client = s.receive_budget.total;
    })
    .await;
    // More stalled streams than the connection window can hold at their
    // full stream windows (16 over QUIC at the defaults, 32 over HTTP/2):
    // without credit lent to stalled streams, these alone would use up the
    // connection's flow control and every other stream would wait.
    let windows = match tr {
        Transport::Quic => {
            let q = transport::quic::QuicSettings::default();
            q.connection_window / q.stream_window
        }
        Transport::H2 => {
            let h = transport::h2::H2Settings::default();
            h.connection_window / h.stream_window
        }
    };
    let stalled_count = windows as usize + 8;
    let mut stalled = Vec::new();
    for _ in 0..stalled_count {
        // A client that reads a little and then stops reading altogether.
        let mut tcp = connect_via(t.server.connect_addr(), &firehose.to_string())
            .await
            .unwrap();
        let mut first = vec![0u8; 1024];
        tcp.read_exact(&mut first).await.unwrap();
        stalled.push(tcp);
    }
    // Let the stalled streams fill every buffer on their path.
    let shared = t.server.shared.clone();
    eventually("stalled streams back up", Duration::from_secs(30), || {
        let before = shared
            .metrics
            .bytes
            .get_or_create(&[("direction", "from_agent")])
            .get();
        let shared = shared.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let after = shared
                .metrics
                .bytes
                .get_or_create(&[("direction", "from_agent")])
                .get();
            before == after
        }
    })
    .await;
    let agent = shared.registry.snapshot().pop().expect("the agent");
    let credit = agent.window.clone();
    assert_eq!(
        credit.stalled_streams(),
        stalled_count as u64,
        "every stalled stream holds lent credit"
    );
    let metrics = shared.render_metrics();
    assert!(
        metrics.contains(&format!(
            "edge_tunnel_stall_credit_bytes {}",
            shared.receive_budget.lent()
        )) && shared.receive_budget.lent() > 0,
        "{metrics}"
    );
    // A new connection through the same agent still opens and moves 64 MiB.
    let tcp = connect_via(t.server.connect_addr(), &echo.to_string())
        .await
        .expect("a new stream opens next to the stalled ones");
    let (sent, echoed) =
        tokio::time::timeout(Duration::from_secs(120), echo_digest(tcp, 64 << 20, 3))
            .await
            .expect("the new stream is not stalled");
    assert_eq!(sent, echoed);
    // The stalled ones are still alive; once read again, they give the
    // credit back.
    for tcp in &mut stalled {
        let mut more = vec![0u8; 64 * 1024];
        tcp.read_exact(&mut more).await.unwrap();
    }
    drop(stalled);
    eventually("lent credit returned", Duration::from_secs(10), || {
        let credit = credit.clone();
        async move { credit.stalled_streams() == 0 }
    })
    .await;
    t.agent.stop().await;
}

async fn targets_outside_the_allow_list_get_403(tr: Transport) {
    let echo = targets::echo_server().await;
    // An allow-list long enough that printing it would not fit in a
    // DialResult (1 KiB): the refusal must still be a 403, and the list
    // must not reach the client.
    let mut allow = allow(&[echo.port()]);
    allow.extend((1..=48).map(|i| format!("10.200.0.{i}:10250,10255,9100")));
    let t = tunnel_with(&allow, tr, |_| {}).await;
    let (status, body) = connect_via(t.server.connect_addr(), "127.0.0.1:22")
        .await
        .unwrap_err();
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("not on the allow-list of node edge-1"),
        "{body}"
    );
    assert!(
        !body.contains("10.200.0.") && !body.contains(&echo.port().to_string()),
        "{body}"
    );
    assert_eq!(
        t.server
            .metric("edge_tunnel_dial_failures_total{reason=\"not_allowed\"}")
            .await,
        1.0
    );
    t.agent.stop().await;
}

async fn connect_to_a_node_without_agent_fails_fast_with_503(tr: Transport) {
    let t = tunnel(&[10250], tr).await;
    for target in ["edge-9:10250", "198.18.0.99:10250"] {
        let started = Instant::now();
        let (status, body) = connect_via(t.server.connect_addr(), target)
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(status, 503, "{target}");
        assert!(body.contains("no live agent"), "{body}");
        assert!(took < Duration::from_millis(100), "{target} took {took:?}");
    }
    assert_eq!(
        t.server
            .metric("edge_tunnel_dial_failures_total{reason=\"no_agent\"}")
            .await,
        2.0
    );
    let (status, _) = connect_via(t.server.connect_addr(), "edge-1")
        .await
        .unwrap_err();
    assert_eq!(status, 400);
    t.agent.stop().await;
}

async fn dial_failures_answer_502(tr: Transport) {
    let t = tunnel(&[1], tr).await;
    // Allowed, but nothing listens on port 1.
    let (status, body) = connect_via(t.server.connect_addr(), "127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(status, 502);
    assert!(body.contains("refused the connection"), "{body}");
    t.agent.stop().await;
}

/// The agent may hold the answer to a transparent dial until the target
/// speaks; a CONNECT client waits for that answer before it says anything,
/// so its answer must never be held, whatever the hold.
async fn a_connect_answer_is_not_held_for_a_silent_target(tr: Transport) {
    init_logging();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let pki = Pki::new();
    pki.issue_agent(NODE, &[localhost()]);
    let server = TestServer::start(&pki).await;
    let mut config = agent_config(&pki, NODE, &server, &allow(&[port]), tr);
    config.result_hold = Duration::from_secs(3600);
    let agent = TestAgent::start(config);
    server.wait_for_agent(NODE, Duration::from_secs(10)).await;
    let target = format!("127.0.0.1:{port}");
    let (tunneled, accepted) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(connect_via(server.connect_addr(), &target), silent.accept())
    })
    .await
    .expect("the CONNECT is answered while the target says nothing");
    let (mut tunneled, mut target) = (tunneled.unwrap(), accepted.unwrap().0);
    // And the connection works both ways afterwards.
    tunneled.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    target.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    target.write_all(b"pong").await.unwrap();
    tunneled.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"pong");
    agent.stop().await;
}

async fn agent_certificate_from_another_ca_is_refused(tr: Transport) {
    let t = tunnel(&[10250], tr).await;
    // A certificate from a foreign CA, next to the server's real ca.crt.
    let foreign = Pki::new();
    let dir = foreign.issue_agent("edge-x", &[localhost()]);
    std::fs::copy(t.pki.server_dir().join("ca.crt"), dir.join("ca.crt")).unwrap();
    let config = agent_config(&foreign, "edge-x", &t.server, &[], tr);
    let err = tunnel_agent::probe::probe(&config)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("rejected this agent's certificate"), "{err}");
    let series = format!(
        "edge_tunnel_handshake_failures_total{{transport=\"{}\",reason=\"tls\"}}",
        tr.name()
    );
    eventually(
        "failed handshake counted",
        Duration::from_secs(5),
        || async { t.server.metric(&series).await >= 1.0 },
    )
    .await;
    t.agent.stop().await;
}

/// A certificate naming an address that is never an edge's (here
/// loopback, on a server that does not allow loopback agents) is refused
/// at registration: the server would otherwise route, and DNAT redirect,
/// traffic that was never the edge's.
async fn an_address_that_is_never_an_edges_is_refused(tr: Transport) {
    init_logging();
    let pki = Pki::new();
    pki.issue_agent(NODE, &[localhost()]);
    let mut settings = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
    settings.addresses.allow_loopback = false;
    let server = TestServer::start_with(settings).await;
    let config = agent_config(&pki, NODE, &server, &[], tr);
    let err = tunnel_agent::probe::probe(&config)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("address_not_allowed") && err.contains("loopback"),
        "{err}"
    );
    assert_eq!(
        server
            .metric("edge_tunnel_registration_refusals_total{reason=\"address_not_allowed\"}")
            .await,
        1.0
    );
}

/// A client holding CONNECT tunnels to one node cannot take the streams
/// the transparent path (the apiserver) needs: CONNECT stops at the limit
/// minus the reserve and is told so at once, instead of a 504 after 12 s
/// once the agent grants no more streams.
async fn connect_stops_at_the_node_stream_limit_minus_the_reserve(tr: Transport) {
    let echo = targets::echo_server().await;
    let Tunnel { server, agent, .. } = tunnel_with(&allow(&[echo.port()]), tr, |s| {
        s.max_streams_per_node = 4;
        s.transparent_stream_reserve = 2;
    })
    .await;
    let target = echo.to_string();
    let first = connect_via(server.connect_addr(), &target).await.unwrap();
    let _second = connect_via(server.connect_addr(), &target).await.unwrap();
    let (status, body) = connect_via(server.connect_addr(), &target)
        .await
        .unwrap_err();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("limit"), "{body}");
    assert_eq!(
        server
            .metric("edge_tunnel_dial_failures_total{reason=\"node_stream_limit\"}")
            .await,
        1.0
    );
    // A tunnel that ends gives its slot back.
    drop(first);
    eventually("a slot is free again", Duration::from_secs(10), || async {
        connect_via(server.connect_addr(), &target).await.is_ok()
    })
    .await;
    agent.stop().await;
}

/// The server tells its connected agents when the replica count changes
/// (`Replicas`, a scale-up or down seen by `--peers-dns`): an agent behind
/// a load balancer then holds that many connections without waiting for a
/// reconnect, and an agent's readiness follows.
async fn a_changed_replica_count_reaches_connected_agents(tr: Transport) {
    init_logging();
    let pki = Pki::new();
    pki.issue_agent(NODE, &[localhost()]);
    let server = TestServer::start(&pki).await;
    let mut config = agent_config(&pki, NODE, &server, &[], tr);
    let admin = free_port();
    config.admin_listen = Some(admin);
    let agent = TestAgent::start(config);
    server.wait_for_agent(NODE, Duration::from_secs(10)).await;
    let expected = |n: u16| {
        let line = format!("edge_tunnel_agent_replicas_expected {n}");
        move || {
            let line = line.clone();
            async move { http_get(admin, "/metrics").await.1.contains(&line) }
        }
    };
    let first = *server.shared.replicas_expected.borrow();
    eventually(
        "the agent expects what Welcome said",
        Duration::from_secs(10),
        expected(first),
    )
    .await;
    server.shared.replicas_expected.send_replace(3);
    eventually("the agent expects 3", Duration::from_secs(10), expected(3)).await;
    // One address leads to this one replica: the further slots find it held.
    let (_, ready) = http_get(admin, "/readyz").await;
    assert!(ready.contains("1 of 3"), "{ready}");
    server.shared.replicas_expected.send_replace(1);
    eventually("the agent expects 1", Duration::from_secs(10), expected(1)).await;
    // Still the one registration, never dropped.
    assert!(matches!(
        server.shared.registry.by_node(NODE),
        tunnel_server::registry::Route::Agent(_)
    ));
    assert_eq!(
        server
            .metric(&format!(
                "edge_tunnel_registrations_total{{transport=\"{}\"}}",
                tr.name()
            ))
            .await,
        1.0
    );
    agent.stop().await;
}

/// A client that stopped reading is reset after --client-stall-timeout,
/// so its unread data does not pin the stream's window and the agent's
/// memory for good; the stream's slot comes back.
async fn a_client_that_stopped_reading_is_reset(tr: Transport) {
    let firehose = targets::firehose_server().await;
    let Tunnel { server, agent, .. } = tunnel_with(&allow(&[firehose.port()]), tr, |s| {
        s.client_stall_timeout = Some(Duration::from_secs(2));
    })
    .await;
    let mut silent = connect_via(server.connect_addr(), &firehose.to_string())
        .await
        .unwrap();
    // The client sees the end: a reset once it reads what was buffered.
    stalled_client_is_reset(&server, &mut silent).await;
    agent.stop().await;
}

/// Waits until the server reset the silent client's stream, then reads
/// what the client has buffered until its connection ends (bounded);
/// returns the last bytes it read.
async fn stalled_client_is_reset(
    server: &TestServer,
    silent: &mut tokio::net::TcpStream,
) -> Vec<u8> {
    eventually(
        "the silent client is reset",
        Duration::from_secs(60),
        || async { server.metric("edge_tunnel_client_stall_resets_total").await >= 1.0 },
    )
    .await;
    eventually("its stream is gone", Duration::from_secs(10), || async {
        server.metric("edge_tunnel_streams_active").await == 0.0
    })
    .await;
    let mut buf = vec![0u8; 1 << 16];
    let mut tail: Vec<u8> = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    let keep = tail.len().saturating_sub(16);
                    tail.drain(..keep);
                }
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client connection was closed");
    tail
}

/// The same for a forwarded plain-HTTP request (Prometheus' `proxy_url`):
/// a client that stops reading a large response is reset too, instead of
/// pinning its agent connection's window for as long as it stays.
async fn a_client_that_stopped_reading_a_forwarded_response_is_reset(tr: Transport) {
    let firehose = targets::http_firehose_server().await;
    let Tunnel { server, agent, .. } = tunnel_with(&allow(&[firehose.port()]), tr, |s| {
        s.client_stall_timeout = Some(Duration::from_secs(2));
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(server.connect_addr())
        .await
        .unwrap();
    silent
        .write_all(
            format!("GET http://{firehose}/metrics HTTP/1.1\r\nHost: {firehose}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    eventually("the stream is relayed", Duration::from_secs(10), || async {
        server
            .metric("edge_tunnel_streams_total{ingress=\"forward\"}")
            .await
            == 1.0
    })
    .await;
    // The client's response ends once it reads what was buffered, and it
    // ends cut, not complete: the target's body has no length, and the
    // reset must not read as its end (no last chunk).
    let tail = stalled_client_is_reset(&server, &mut silent).await;
    assert!(
        !tail.ends_with(b"0\r\n\r\n"),
        "a cut response ended like a complete one: {:?}",
        String::from_utf8_lossy(&tail)
    );
    agent.stop().await;
}

async fn a_client_over_its_stream_limit_gets_429(tr: Transport) {
    let echo = targets::echo_server().await;
    let Tunnel { server, agent, .. } = tunnel_with(&allow(&[echo.port()]), tr, |s| {
        s.max_streams_per_client = 2;
    })
    .await;
    let target = echo.to_string();
    let first = connect_via(server.connect_addr(), &target).await.unwrap();
    let _second = connect_via(server.connect_addr(), &target).await.unwrap();
    let (status, body) = connect_via(server.connect_addr(), &target)
        .await
        .expect_err("a third tunnel from the same client is refused");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("--max-streams-per-client"), "{body}");
    assert_eq!(
        server
            .metric("edge_tunnel_client_stream_limit_hits_total")
            .await,
        1.0
    );
    let page = server.metrics().await;
    assert!(
        page.contains(&format!("edge_tunnel_node_streams{{node=\"{NODE}\"}} 2")),
        "{page}"
    );
    assert!(
        page.contains("edge_tunnel_node_stream_limit 8192"),
        "{page}"
    );
    assert!(page.contains("edge_tunnel_clients 1"), "{page}");
    // Closing one gives its place back.
    drop(first);
    eventually("a place is free again", Duration::from_secs(10), || async {
        connect_via(server.connect_addr(), &target).await.is_ok()
    })
    .await;
    agent.stop().await;
}

async fn an_idle_tunnel_is_reset_after_the_relay_idle_timeout(tr: Transport) {
    let echo = targets::echo_server().await;
    let Tunnel { server, agent, .. } = tunnel_with(&allow(&[echo.port()]), tr, |s| {
        s.relay_idle_timeout = Some(Duration::from_secs(1));
    })
    .await;
    let mut tcp = connect_via(server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    // Traffic keeps it open past the timeout.
    for _ in 0..6 {
        tcp.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tcp.read_exact(&mut back).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        server.metric("edge_tunnel_relay_idle_resets_total").await,
        0.0
    );
    // Then it goes quiet, and is reset.
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "the idle tunnel was closed: {ended:?}"
    );
    eventually("counted", Duration::from_secs(10), || async {
        server.metric("edge_tunnel_relay_idle_resets_total").await == 1.0
            && server.metric("edge_tunnel_streams_active").await == 0.0
    })
    .await;
    agent.stop().await;
}

async fn node_name_must_match_the_certificate(tr: Transport) {
    let t = tunnel(&[10250], tr).await;
    // At start-up: the agent refuses to run.
    let err = tunnel_agent::AgentConfig::try_new(
        &t.server.addrs.quic.to_string(),
        &t.pki.agent_dir(NODE),
        "edge-2",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("\"edge-2\"") && err.contains("\"edge-1\""),
        "{err}"
    );
    // On the wire: a Hello that lies about the node is refused by the server.
    let config = agent_config(&t.pki, NODE, &t.server, &[], tr);
    let mut lying = config.credentials().unwrap();
    lying.node = "edge-2".into();
    let err = tunnel_agent::probe::probe_with(&config, lying)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("node_mismatch") && err.contains("common name"),
        "{err}"
    );
    // Claiming an address the certificate does not carry.
    let mut lying = config.credentials().unwrap();
    lying.addresses = vec!["198.18.9.9".parse().unwrap()];
    let err = tunnel_agent::probe::probe_with(&config, lying)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("address_not_in_certificate") && err.contains("198.18.9.9"),
        "{err}"
    );
    assert_eq!(
        t.server
            .metric("edge_tunnel_registration_refusals_total{reason=\"node_mismatch\"}")
            .await,
        1.0
    );
    assert_eq!(
        t.server
            .metric(
                "edge_tunnel_registration_refusals_total{reason=\"address_not_in_certificate\"}"
            )
            .await,
        1.0
    );
    // The real agent is untouched.
    assert!(matches!(
        t.server.shared.registry.by_node(NODE),
        tunnel_server::registry::Route::Agent(_)
    ));
    t.agent.stop().await;
}

async fn agent_is_back_within_5s_of_a_server_restart(tr: Transport) {
    let echo = targets::echo_server().await;
    let t = tunnel(&[echo.port()], tr).await;
    let quic = t.server.addrs.quic;
    t.server.stop().await;
    let restarted = Instant::now();
    let server = TestServer::start_with(TestServer::config(&t.pki, quic)).await;
    server.wait_for_agent(NODE, Duration::from_secs(5)).await;
    let tcp = connect_via(server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    let (sent, echoed) = echo_digest(tcp, 1 << 20, 9).await;
    assert_eq!(sent, echoed);
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "{:?}",
        restarted.elapsed()
    );
    t.agent.stop().await;
}

/// Each tunneled stream holds a socket to its target, and the agent's
/// open-files limit bounds its streams (`max_streams`): over all its
/// connections together, not per connection, or two replicas could open
/// twice the descriptors it has. Past the bound a dial is refused at once,
/// before a socket is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_stream_bound_holds_over_all_its_replicas() {
    init_logging();
    let echo = targets::echo_server().await;
    let pki = Pki::new();
    pki.issue_agent(NODE, &[localhost()]);
    let replica = |id: &str| {
        let mut s = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
        s.server_id = id.into();
        s
    };
    let one = TestServer::start_with(replica("r1")).await;
    let two = TestServer::start_with(replica("r2")).await;
    let allow = [format!("127.0.0.1:{}", echo.port())];
    let mut config = tunnel_agent::AgentConfig::try_new(
        &format!("{},{}", one.addrs.quic, two.addrs.quic),
        &pki.agent_dir(NODE),
        NODE,
        &allow,
    )
    .unwrap();
    config.quic.max_streams = 2;
    let admin = free_port();
    config.admin_listen = Some(admin);
    let agent = TestAgent::start(config);
    one.wait_for_agent(NODE, Duration::from_secs(10)).await;
    two.wait_for_agent(NODE, Duration::from_secs(10)).await;
    let target = echo.to_string();
    let _a = connect_via(one.connect_addr(), &target).await.unwrap();
    let _b = connect_via(two.connect_addr(), &target).await.unwrap();
    // Each connection would grant two; the agent has room for two in all.
    let (status, body) = connect_via(two.connect_addr(), &target)
        .await
        .expect_err("a third stream over the agent's bound is refused");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("open-files limit"), "{body}");
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("edge_tunnel_agent_dials_total{result=\"stream_limit\"} 1"),
        "{metrics}"
    );
    // One ends: there is room again.
    drop(_a);
    eventually(
        "room for a stream again",
        Duration::from_secs(10),
        || async { connect_via(one.connect_addr(), &target).await.is_ok() },
    )
    .await;
    agent.stop().await;
}

/// A rolling update of the server must not move `auto` agents to HTTP/2:
/// while the server is down QUIC gets no answer and TCP is refused, which
/// is no reason to fall back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_agent_stays_on_quic_across_a_server_restart() {
    init_logging();
    let pki = Pki::new();
    pki.issue_agent(NODE, &[localhost()]);
    let server = TestServer::start(&pki).await;
    let quic = server.addrs.quic;
    let mut config = TestAgent::config(&pki, NODE, quic, &[]);
    config.transport = tunnel_agent::config::TransportChoice::Auto;
    config.quic_timeout = Duration::from_millis(500);
    let admin = free_port();
    config.admin_listen = Some(admin);
    let agent = TestAgent::start(config);
    server.wait_for_agent(NODE, Duration::from_secs(10)).await;
    server.stop().await;
    // Down long enough for attempts over both transports to fail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server = TestServer::start_with(TestServer::config(&pki, quic)).await;
    server.wait_for_agent(NODE, Duration::from_secs(15)).await;
    // The attempt that meets the restarted server may have sent its QUIC
    // Initial before the UDP socket was bound and registered over HTTP/2
    // (the TCP listener was up by then): the selector then tries QUIC
    // again at once and moves over, counting no fallback. The agent must
    // end on QUIC either way.
    eventually(
        "the agent is registered over QUIC",
        Duration::from_secs(10),
        || async {
            matches!(
                server.shared.registry.by_node(NODE),
                tunnel_server::registry::Route::Agent(a) if a.link.transport() == "quic"
            )
        },
    )
    .await;
    eventually(
        "the agent holds the replica",
        Duration::from_secs(5),
        || async {
            let (_, metrics) = http_get(admin, "/metrics").await;
            metrics.contains("edge_tunnel_agent_replicas_connected{transport=\"quic\"} 1")
        },
    )
    .await;
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        !metrics.contains("transport_fallbacks_total{"),
        "no fallback counted:\n{metrics}"
    );
    agent.stop().await;
}

/// A renewed certificate applies whole at the next connection: the TLS
/// identity, the addresses in `Hello`, and the default allow-list.
async fn a_renewed_certificate_applies_whole_at_reconnect(tr: Transport) {
    // No --allow: the default list, from the certificate.
    let t = tunnel_with(&[], tr, |_| {}).await;
    let config = agent_config(&t.pki, NODE, &t.server, &[], tr);
    let second: IpAddr = "127.0.0.2".parse().unwrap();
    let kubelet = std::net::SocketAddr::new(second, 10250);
    assert!(!config.credentials().unwrap().allow.permits(kubelet));
    t.pki.issue_agent(NODE, &[localhost(), second]);
    let credentials = config.credentials().unwrap();
    assert_eq!(credentials.addresses, [localhost(), second]);
    assert!(credentials.allow.permits(kubelet));
    // The running agent presents the new addresses once it reconnects.
    let quic = t.server.addrs.quic;
    t.server.stop().await;
    let server = TestServer::start_with(TestServer::config(&t.pki, quic)).await;
    server.wait_for_agent(NODE, Duration::from_secs(10)).await;
    assert!(matches!(
        server.shared.registry.by_address(second),
        tunnel_server::registry::Route::Agent(a) if a.node == NODE
    ));
    t.agent.stop().await;
}

/// A rolling update with surge: the new agent process starts while the
/// old one serves. It finds the instance lock held, registers as the
/// successor, and the old process's open stream keeps working while new
/// connections go through the new one; the new one takes the admin address
/// once the old one ends.
async fn a_successor_takes_over_while_the_old_process_finishes_its_streams(tr: Transport) {
    succession(tr, true, false).await;
}

/// The successor ends first (it crashed, or the update was rolled back)
/// while the old process still runs: the old one serves the node again.
async fn a_successor_that_ends_first_hands_the_node_back(tr: Transport) {
    succession(tr, true, true).await;
}

/// The first rolling update onto a release with the lock: the old agent
/// does not hold it, but its admin address is the sign.
async fn an_agent_from_before_the_lock_is_succeeded_too(tr: Transport) {
    succession(tr, false, false).await;
}

async fn succession(tr: Transport, old_takes_the_lock: bool, new_ends_first: bool) {
    init_logging();
    let echo = targets::echo_server().await;
    let pki = Pki::new();
    pki.issue_agent(NODE, &[localhost()]);
    let server = TestServer::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let config = || {
        let mut c = agent_config(&pki, NODE, &server, &allow(&[echo.port()]), tr);
        c.instance_lock = Some(dir.path().join("agent.lock"));
        c.admin_listen = Some(admin);
        c
    };
    let mut old = config();
    if !old_takes_the_lock {
        old.instance_lock = None;
    }
    let first = TestAgent::start(old);
    server.wait_for_agent(NODE, Duration::from_secs(10)).await;
    let first_id = server.shared.registry.registered(NODE).unwrap().id;
    let mut old_stream = connect_via(server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    old_stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    old_stream.read_exact(&mut buf).await.unwrap();

    let mut new = config();
    // Its own status file (the pod's emptyDir): its probes' view of it,
    // while the old process holds the admin address.
    let status = dir.path().join("status");
    new.status_file = Some(status.clone());
    let second = TestAgent::start(new);
    let registry = &server.shared.registry;
    eventually("the successor registered", Duration::from_secs(10), || {
        let took_over = registry
            .registered(NODE)
            .is_some_and(|a| a.id != first_id && a.supersedes.load(Ordering::Relaxed) != 0);
        async move { took_over }
    })
    .await;
    eventually(
        "the successor's status file says ready",
        Duration::from_secs(10),
        || {
            let ready = tunnel_agent::status::check(&status, true, Duration::from_secs(30));
            async move { ready.is_ok() }
        },
    )
    .await;
    // The old process's stream still flows, both ways.
    old_stream.write_all(b"pong").await.unwrap();
    old_stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    // New connections go through the successor.
    let tcp = connect_via(server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    let (a, b) = echo_digest(tcp, 1 << 20, 5).await;
    assert_eq!(a, b);
    assert_eq!(registry.len(), 1);

    if new_ends_first {
        second.stop().await;
        eventually(
            "the old process serves the node again",
            Duration::from_secs(10),
            || {
                let back = matches!(registry.by_node(NODE),
                    tunnel_server::registry::Route::Agent(a) if a.id == first_id);
                async move { back }
            },
        )
        .await;
        let tcp = connect_via(server.connect_addr(), &echo.to_string())
            .await
            .unwrap();
        let (a, b) = echo_digest(tcp, 1 << 16, 7).await;
        assert_eq!(a, b);
        old_stream.write_all(b"more").await.unwrap();
        old_stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"more");
        drop(old_stream);
        first.stop().await;
        return;
    }

    // Its stream done, the old process keeps its connection (and stays
    // ready) until it ends: its pod deleted, it drains.
    drop(old_stream);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = http_get(admin, "/readyz").await;
    assert_eq!(status, 200, "the old process is still ready");
    first.stop().await;
    // Nothing keeps the old connection once it ended.
    let successor = registry.registered(NODE).unwrap();
    eventually(
        "the old connection is freed",
        Duration::from_secs(10),
        || {
            let freed = successor
                .predecessor
                .lock()
                .unwrap()
                .as_ref()
                .is_none_or(|old| old.upgrade().is_none());
            async move { freed }
        },
    )
    .await;
    eventually(
        "the successor serves the admin address",
        Duration::from_secs(10),
        || async move { tokio::net::TcpStream::connect(admin).await.is_ok() },
    )
    .await;
    let (status, _) = http_get(admin, "/readyz").await;
    assert_eq!(status, 200);
    let tcp = connect_via(server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    let (a, b) = echo_digest(tcp, 1 << 16, 6).await;
    assert_eq!(a, b);
    second.stop().await;
}

/// Two nodes' certificates carry the same address: the node that holds it
/// keeps it (the other is refused, and counted), and the refused one's
/// exit does not take it away.
async fn an_address_is_not_taken_over_by_another_nodes_certificate(tr: Transport) {
    let echo = targets::echo_server().await;
    let t = tunnel(&[echo.port()], tr).await;
    let intruder = "edge-2";
    t.pki.issue_agent(intruder, &[localhost()]);
    let second = TestAgent::start(agent_config(
        &t.pki,
        intruder,
        &t.server,
        &allow(&[echo.port()]),
        tr,
    ));
    let refusals = "edge_tunnel_registration_refusals_total{reason=\"address_in_use\"}";
    eventually(
        "the second node is refused",
        Duration::from_secs(10),
        || {
            let server = &t.server;
            async move { server.metric(refusals).await >= 1.0 }
        },
    )
    .await;
    let route = |registry: &tunnel_server::registry::AgentRegistry| match registry
        .by_address(localhost())
    {
        tunnel_server::registry::Route::Agent(a) => Some(a.node.clone()),
        _ => None,
    };
    assert_eq!(route(&t.server.shared.registry).as_deref(), Some(NODE));
    assert!(matches!(
        t.server.shared.registry.by_node(intruder),
        tunnel_server::registry::Route::NoAgent
    ));
    let mut tcp = connect_via(t.server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tcp.read_exact(&mut buf).await.unwrap();
    drop(tcp);
    // The refused node leaves: the rightful one keeps its address (and its
    // DNAT rules, which follow `addresses()`).
    second.stop().await;
    assert_eq!(route(&t.server.shared.registry).as_deref(), Some(NODE));
    assert_eq!(t.server.shared.registry.addresses(), [localhost()]);
    // Once the holder leaves, the other node may have the address.
    let second = TestAgent::start(agent_config(
        &t.pki,
        intruder,
        &t.server,
        &allow(&[echo.port()]),
        tr,
    ));
    eventually(
        "the second node is refused again",
        Duration::from_secs(10),
        || {
            let server = &t.server;
            async move { server.metric(refusals).await >= 2.0 }
        },
    )
    .await;
    t.agent.stop().await;
    t.server
        .wait_for_agent(intruder, Duration::from_secs(60))
        .await;
    assert_eq!(route(&t.server.shared.registry).as_deref(), Some(intruder));
    second.stop().await;
    let registry = &t.server.shared.registry;
    eventually("no address left behind", Duration::from_secs(10), || {
        let empty = registry.addresses().is_empty();
        async move { empty }
    })
    .await;
}

async fn a_second_registration_replaces_the_first(tr: Transport) {
    let echo = targets::echo_server().await;
    let t = tunnel(&[echo.port()], tr).await;
    let first_id = match t.server.shared.registry.by_node(NODE) {
        tunnel_server::registry::Route::Agent(a) => a.id,
        _ => unreachable!(),
    };
    let mut old_stream = connect_via(t.server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    old_stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    old_stream.read_exact(&mut buf).await.unwrap();
    // A second agent for the same node (a restarted pod, for example).
    let second = TestAgent::start(agent_config(
        &t.pki,
        NODE,
        &t.server,
        &allow(&[echo.port()]),
        tr,
    ));
    let shared = t.server.shared.clone();
    eventually(
        "second connection registered",
        Duration::from_secs(10),
        || {
            let replaced = matches!(shared.registry.by_node(NODE),
            tunnel_server::registry::Route::Agent(a) if a.id != first_id);
            async move { replaced }
        },
    )
    .await;
    // The old connection's stream ended (reset or EOF), never hangs.
    let end = tokio::time::timeout(Duration::from_secs(5), old_stream.read(&mut buf))
        .await
        .expect("old stream ends");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert_eq!(t.server.shared.registry.len(), 1);
    // New connections go through the replacement.
    let tcp = connect_via(t.server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    let (a, b) = echo_digest(tcp, 1 << 20, 5).await;
    assert_eq!(a, b);
    drop(t.agent);
    second.stop().await;
}

async fn drain_finishes_active_streams_and_refuses_new_ones(tr: Transport) {
    let echo = targets::echo_server().await;
    let t = tunnel(&[echo.port()], tr).await;
    let mut active = connect_via(t.server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    active.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    active.read_exact(&mut buf).await.unwrap();
    let stopping = tokio::spawn(t.agent.stop());
    let shared = t.server.shared.clone();
    eventually("agent marked draining", Duration::from_secs(5), || {
        let draining = matches!(
            shared.registry.by_node(NODE),
            tunnel_server::registry::Route::Draining(_)
        );
        async move { draining }
    })
    .await;
    let (status, body) = connect_via(t.server.connect_addr(), &echo.to_string())
        .await
        .unwrap_err();
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");
    // The active stream still works, then ends cleanly.
    active.write_all(b"during").await.unwrap();
    active.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    active.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), active.read_to_end(&mut rest))
        .await
        .expect("the drained stream ends")
        .expect("with a clean EOF");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("agent exits once its stream is done")
        .expect("agent stop task");
}

async fn admin_endpoints(tr: Transport) {
    // A target that reads to EOF and then holds the connection until told.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut held, _) = l.accept().await.unwrap();
        let mut all = Vec::new();
        let _ = held.read_to_end(&mut all).await;
        let _ = released.await;
    });
    let t = tunnel(&[10250, target.port()], tr).await;
    let admin = t.server.addrs.admin.unwrap();
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    assert_eq!(http_get(admin, "/nope").await.0, 404);
    // The admin listener's own bound and what it holds now (this request).
    let (status, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for series in [
        "edge_tunnel_admin_connections_limit 64",
        "edge_tunnel_admin_connection_waits_total 0",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    // This request's connection at least (earlier ones may not have been
    // reaped yet).
    let open = metric_in(&metrics, "edge_tunnel_admin_connections ");
    assert!(
        (1.0..=64.0).contains(&open),
        "admin connections open: {open}"
    );
    let (status, body) = http_get(admin, "/v1/agents").await;
    assert_eq!(status, 200);
    let agents: serde_json::Value = serde_json::from_str(&body).unwrap();
    let a = &agents[0];
    assert_eq!(a["node"], NODE);
    assert_eq!(a["addresses"][0], "127.0.0.1");
    assert_eq!(a["transport"], tr.name());
    match tr {
        Transport::Quic => {
            assert!(a["rtt_ms"].as_f64().unwrap() >= 0.0);
            let path = &a["quic_path"];
            assert!(
                path["congestion_window_bytes"].as_u64().unwrap() > 0,
                "{path}"
            );
            assert!(path["sent_packets"].as_u64().unwrap() > 0, "{path}");
            assert!(path["lost_packets"].as_u64().is_some(), "{path}");
            assert!(path["congestion_events"].as_u64().is_some(), "{path}");
        }
        Transport::H2 => {
            assert!(a["rtt_ms"].is_null());
            assert!(a["quic_path"].is_null());
        }
    }
    assert!(a["connected_since"].as_str().unwrap().contains('T'));
    // A tunneled connection open now, half-closed by its client.
    let (status, body) = http_get(admin, "/v1/connections").await;
    assert_eq!(status, 200);
    let none: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(none["open"], 0, "{body}");
    let mut tcp = connect_via(t.server.connect_addr(), &target.to_string())
        .await
        .unwrap();
    tcp.write_all(b"data").await.unwrap();
    tcp.shutdown().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let body = http_get(admin, "/v1/connections").await.1;
        let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
        if listed["oldest"][0]["client_to_tunnel_finished"] == true {
            break listed;
        }
        assert!(
            Instant::now() < deadline,
            "the half-close never showed: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(listed["open"], 1, "{listed}");
    let c = &listed["oldest"][0];
    assert_eq!(c["node"], NODE, "{listed}");
    assert_eq!(c["target"], target.to_string(), "{listed}");
    assert_eq!(c["client"], "127.0.0.1", "{listed}");
    assert_eq!(c["ingress"], "connect", "{listed}");
    assert_eq!(c["tunnel_to_client_finished"], false, "{listed}");
    assert!(c["open_secs"].as_f64().unwrap() >= 0.0, "{listed}");
    let _ = release.send(());
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.unwrap();
    let metrics = t.server.metrics().await;
    let registered = format!(
        "edge_tunnel_registrations_total{{transport=\"{}\"}} 1",
        tr.name()
    );
    assert!(
        metrics.contains(&registered),
        "missing {registered} in\n{metrics}"
    );
    for name in [
        "edge_tunnel_agents_connected 1",
        "edge_tunnel_streams_active",
        "edge_tunnel_dial_duration_seconds",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    t.agent.stop().await;
}

/// With no relay buffer growth allowed (`--relay-buffer-budget 0`) every
/// relay of the server keeps its first 4 KiB buffers: a bulk echo still
/// arrives whole, and the doublings refused are counted.
async fn relays_go_on_when_the_buffer_budget_is_spent(tr: Transport) {
    let echo = targets::echo_server().await;
    let t = tunnel_with(&allow(&[echo.port()]), tr, |s| s.relay_buffer_budget = 0).await;
    let tcp = connect_via(t.server.connect_addr(), &echo.to_string())
        .await
        .unwrap();
    let (sent, echoed) = echo_digest(tcp, 8 << 20, 5).await;
    assert_eq!(sent, echoed);
    let metrics = t.server.metrics().await;
    for series in [
        "edge_tunnel_relay_buffer_budget_bytes 0",
        "edge_tunnel_relay_buffer_grown_bytes 0",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    let refused = metric_in(&metrics, "edge_tunnel_relay_buffer_growth_refused_total ");
    assert!(refused >= 1.0, "refusals counted: {refused}");
    t.agent.stop().await;
}

/// A client that half-closes in the middle of a download from a target
/// that writes without end (and ignores the FIN), then goes away: the
/// target's connection must end too, however the client's end races the
/// data in flight. The benchmark once found the agent's side of such a
/// stream still open, its write to the tunnel waiting for good.
async fn a_download_cut_short_after_a_half_close_ends_at_the_target(tr: Transport) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let ended_tx = ended_tx.clone();
            tokio::spawn(async move {
                let block = pattern(256 * 1024, 9);
                while tcp.write_all(&block).await.is_ok() {}
                let _ = ended_tx.send(());
            });
        }
    });
    let t = tunnel(&[target.port()], tr).await;
    const CLIENTS: usize = 24;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let proxy = t.server.connect_addr();
        clients.push(tokio::spawn(async move {
            let mut tcp = connect_via(proxy, &target.to_string()).await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < (1 + i % 4) * 1024 * 1024 {
                got += tcp.read(&mut buf).await.unwrap();
            }
            tcp.shutdown().await.unwrap();
            // Some read on for a moment after their FIN, some leave at once;
            // some leave nothing unread (a FIN), most something (a reset).
            for _ in 0..(i % 3) * 8 {
                let _ = tcp.read(&mut buf).await;
            }
            drop(tcp);
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    for n in 0..CLIENTS {
        tokio::time::timeout(Duration::from_secs(30), ended.recv())
            .await
            .unwrap_or_else(|_| panic!("{n} of {CLIENTS} target connections ended; the rest hang"))
            .unwrap();
    }
    t.agent.stop().await;
}

/// The other way: clients upload without end to a target that resets the
/// connection after a while. The agent stops the stream, and the server's
/// write to the tunnel, blocked on flow control, must learn of it, so that
/// every client sees its upload end. (This one passed before the fix for
/// the test above too: here the agent's STOP_SENDING comes with new
/// connection credit, so quinn's retried write meets the stop.)
async fn an_upload_cut_short_by_the_target_ends_at_the_client(tr: Transport) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok((mut tcp, _)) = l.accept().await {
            n += 1;
            let quota = (1 + n % 4) * 1024 * 1024;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0;
                while got < quota {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got += k,
                    }
                }
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            });
        }
    });
    let t = tunnel(&[target.port()], tr).await;
    const CLIENTS: usize = 24;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let proxy = t.server.connect_addr();
        clients.push(tokio::spawn(async move {
            let mut tcp = connect_via(proxy, &target.to_string()).await.unwrap();
            let block = pattern(256 * 1024, 5);
            while tcp.write_all(&block).await.is_ok() {}
        }));
    }
    for (n, c) in clients.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .unwrap_or_else(|_| panic!("{n} of {CLIENTS} uploads ended; the rest hang"))
            .unwrap();
    }
    t.agent.stop().await;
}

/// Runs each test once over QUIC and once over HTTP/2: `NAME::quic`, `NAME::h2`.
macro_rules! over_both_transports {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                super::$name(super::Transport::Quic).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn h2() {
                super::$name(super::Transport::H2).await
            }
        }
    )*};
}

over_both_transports!(
    a_download_cut_short_after_a_half_close_ends_at_the_target,
    an_upload_cut_short_by_the_target_ends_at_the_client,
    relays_go_on_when_the_buffer_budget_is_spent,
    a_client_that_stopped_reading_is_reset,
    a_client_that_stopped_reading_a_forwarded_response_is_reset,
    a_changed_replica_count_reaches_connected_agents,
    a_client_over_its_stream_limit_gets_429,
    an_idle_tunnel_is_reset_after_the_relay_idle_timeout,
    connect_stops_at_the_node_stream_limit_minus_the_reserve,
    an_address_that_is_never_an_edges_is_refused,
    a_renewed_certificate_applies_whole_at_reconnect,
    https_through_connect_verifies_the_targets_own_certificate,
    streaming_logs_arrive_as_written,
    websocket_exec_session_echoes,
    half_close_still_delivers_the_response,
    target_reset_reaches_the_client_as_a_reset,
    client_reset_reaches_the_target_as_a_reset,
    one_gib_each_way_on_one_connection,
    thousand_concurrent_connections_of_256_kib,
    streams_past_the_first_grant_are_open_at_once,
    stalled_readers_do_not_stall_other_streams,
    targets_outside_the_allow_list_get_403,
    connect_to_a_node_without_agent_fails_fast_with_503,
    dial_failures_answer_502,
    a_connect_answer_is_not_held_for_a_silent_target,
    agent_certificate_from_another_ca_is_refused,
    node_name_must_match_the_certificate,
    agent_is_back_within_5s_of_a_server_restart,
    a_second_registration_replaces_the_first,
    a_successor_takes_over_while_the_old_process_finishes_its_streams,
    an_agent_from_before_the_lock_is_succeeded_too,
    a_successor_that_ends_first_hands_the_node_back,
    an_address_is_not_taken_over_by_another_nodes_certificate,
    drain_finishes_active_streams_and_refuses_new_ones,
    admin_endpoints,
);
