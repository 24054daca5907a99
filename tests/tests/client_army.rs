//! A non-reading client army against the real `tunnel-server` binary (its
//! own process, so its memory is what /proc says; no root needed): 1,200
//! CONNECT tunnels across 8 agents to an endpoint that writes without
//! end, from clients that read nothing. Before the receive budget every
//! agent connection kept its full window and a quarter of a separate
//! 256 MiB stall budget, and this took the server to 515-608 MiB. Now all
//! windows together stay within `--receive-budget`, the server's growth
//! stays within a bound computed from it, `/healthz` answers and a
//! legitimate client still moves data through the same agents.
//!
//! What this does not cover: a client that keeps reopening non-reading
//! tunnels to one node keeps that node's connection window full (each is
//! shed after `--stall-shed-timeout`, and a new one takes its credit);
//! see SECURITY.md.
//!
//! The two tests run one at a time ([`SERIAL`]): they load the machine.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::netns::proc::bin;
use e2e::targets;
use e2e::{connect_via, eventually, free_port, http_get, metric_in, KillOnDrop, Pki, TestAgent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tunnel_agent::config::TransportChoice;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const AGENTS: u8 = 8;
const STREAMS: usize = 1200;
/// Client source addresses (127.0.0.2 ..), so the per-client cap on stall
/// credit leaves the process-wide budget something to bound.
const CLIENT_SOURCES: u8 = 6;
const BUDGET_MIB: u64 = 16;

/// An endpoint on `ip` that writes without end to whoever connects.
async fn firehose_on(ip: IpAddr) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let block = targets::pattern(64 * 1024, 7);
                while tcp.write_all(&block).await.is_ok() {}
            });
        }
    });
    addr
}

/// A CONNECT from a chosen loopback source address; the status if not 200.
async fn connect_from(source: IpAddr, proxy: SocketAddr, target: &str) -> Result<TcpStream, u16> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut tcp = socket.connect(proxy).await.map_err(|_| 0u16)?;
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .map_err(|_| 0u16)?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.map_err(|_| 0u16)? != 1 {
            return Err(0);
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status == 200 {
        Ok(tcp)
    } else {
        Err(status)
    }
}

/// What the soldiers share.
#[derive(Default)]
struct Army {
    /// Soldiers without a tunnel try again while this is true.
    recruiting: AtomicBool,
    /// Tunnels opened, and CONNECTs waiting for their answer now.
    tunnels: AtomicU64,
    dialing: AtomicU64,
}

/// One soldier: CONNECTs to the firehose (again after a refusal, while the
/// army is recruiting) and then holds its tunnel, reading nothing, until
/// the task is aborted. A tunnel the server sheds is not reopened.
async fn soldier(source: IpAddr, proxy: SocketAddr, target: String, army: Arc<Army>) {
    while army.recruiting.load(Ordering::Relaxed) {
        army.dialing.fetch_add(1, Ordering::Relaxed);
        let tunnel = connect_from(source, proxy, &target).await;
        army.dialing.fetch_sub(1, Ordering::Relaxed);
        let Ok(tcp) = tunnel else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        army.tunnels.fetch_add(1, Ordering::Relaxed);
        std::future::pending::<()>().await;
        drop(tcp);
    }
}

fn status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a /proc status field")
}

async fn army(transport: TransportChoice) {
    let _serial = SERIAL.lock().await;
    e2e::init_logging();
    let pki = Pki::new();
    let (quic, connect, admin) = (free_port(), free_port(), free_port());
    let child = Command::new(bin("tunnel-server"))
        .args(["--listen", &quic.to_string()])
        .args(["--cert-dir", pki.server_dir().to_str().unwrap()])
        .args(["--connect-listen", &connect.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--receive-budget", &format!("{BUDGET_MIB}Mi")])
        .arg("--allow-loopback-agents")
        .args(["--server-id", "army"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the tunnel-server binary (cargo build --bins)");
    let server = KillOnDrop(child);
    eventually("server ready", Duration::from_secs(10), || async {
        TcpStream::connect(admin).await.is_ok() && http_get(admin, "/readyz").await.0 == 200
    })
    .await;

    let mut agents = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..AGENTS {
        let ip = IpAddr::from([127, 0, 0, 100 + i]);
        let node = format!("edge-{i}");
        pki.issue_agent(&node, &[ip]);
        let firehose = firehose_on(ip).await;
        let echo = targets::echo_server_on(SocketAddr::new(ip, 0)).await;
        let allow = vec![format!("{ip}:{},{}", firehose.port(), echo.port())];
        let mut config = TestAgent::config(&pki, &node, quic, &allow);
        config.transport = transport;
        agents.push(TestAgent::start(config));
        nodes.push((node, firehose.port(), echo.port()));
    }
    eventually(
        "every agent registered",
        Duration::from_secs(30),
        || async {
            let page = http_get(admin, "/metrics").await.1;
            metric_in(&page, "edge_tunnel_agents_connected ") == f64::from(AGENTS)
        },
    )
    .await;
    let pid = server.0.id();
    let baseline = status_field(pid, "VmRSS:");

    // The army, from several client addresses, to every agent's firehose.
    let army = Arc::new(Army::default());
    army.recruiting.store(true, Ordering::Relaxed);
    let mut soldiers = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let (node, firehose, _) = &nodes[i % nodes.len()];
        let source = IpAddr::from([127, 0, 0, 2 + (i % usize::from(CLIENT_SOURCES)) as u8]);
        soldiers.spawn(soldier(
            source,
            connect,
            format!("{node}:{firehose}"),
            army.clone(),
        ));
    }
    // Over QUIC a dial's answer needs connection credit, which the army
    // itself holds until its streams are shed (SECURITY.md, known gaps):
    // on a loaded machine the last tunnels can take minutes. Half of them
    // is an army; every one is reported.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while army.tunnels.load(Ordering::Relaxed) < STREAMS as u64
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        army.tunnels.load(Ordering::Relaxed) >= STREAMS as u64 / 2,
        "the army opened only {} tunnels",
        army.tunnels.load(Ordering::Relaxed)
    );
    // The army holds what it has; its last CONNECTs get their answers
    // (each within the 12 s dial deadline).
    army.recruiting.store(false, Ordering::Relaxed);
    eventually(
        "the army's last dials answered",
        Duration::from_secs(30),
        || async { army.dialing.load(Ordering::Relaxed) == 0 },
    )
    .await;
    // Until the relayed bytes stop growing: every window is full, and
    // the streams no credit was left for have been shed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut prev = -1.0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let page = http_get(admin, "/metrics").await.1;
        let now = metric_in(
            &page,
            "edge_tunnel_relayed_bytes_total{direction=\"from_agent\"} ",
        );
        if now == prev {
            break;
        }
        prev = now;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the army's streams never backed up"
        );
    }
    // The streams no credit was left for are shed after
    // --stall-shed-timeout (2 s), giving their credit back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Under attack: the windows stay within the budget, the server answers
    // its probes, and a reading client gets through every agent.
    let budget = (BUDGET_MIB << 20) as f64;
    let mut most_windows = 0.0f64;
    let mut most_lent = 0.0f64;
    for round in 0..nodes.len() {
        let page = http_get(admin, "/metrics").await.1;
        let windows = metric_in(&page, "edge_tunnel_receive_windows_bytes ");
        most_windows = most_windows.max(windows);
        most_lent = most_lent.max(metric_in(&page, "edge_tunnel_stall_credit_bytes "));
        assert!(
            windows <= budget,
            "windows {windows} over the budget {budget}"
        );
        let probe = tokio::time::timeout(Duration::from_secs(2), http_get(admin, "/healthz"));
        assert_eq!(probe.await.expect("liveness probe answered").0, 200);
        let (node, _, echo) = &nodes[round % nodes.len()];
        let legit = async {
            // One retry: over QUIC a dial's answer is flow-controlled data,
            // and an agent connection whose window the army filled answers
            // only once the shed streams' credit is back (the known gap in
            // SECURITY.md); a CI machine under load can take longer than
            // one dial deadline for that.
            let target = format!("{node}:{echo}");
            let mut tcp = match connect_via(connect, &target).await {
                Ok(tcp) => tcp,
                Err((504, body)) => {
                    eprintln!(
                        "{transport:?}: first dial through {node} timed out ({body}); retrying"
                    );
                    connect_via(connect, &target)
                        .await
                        .expect("CONNECT to the echo endpoint, second try")
                }
                Err(e) => panic!("CONNECT to the echo endpoint: {e:?}"),
            };
            // A scrape's worth: a request and a few KiB back.
            let data = targets::pattern(8 * 1024, 3);
            tcp.write_all(&data).await.unwrap();
            let mut back = vec![0u8; data.len()];
            tcp.read_exact(&mut back).await.unwrap();
            assert_eq!(back, data);
        };
        tokio::time::timeout(Duration::from_secs(40), legit)
            .await
            .expect("a reading client got through during the attack");
    }
    let page = http_get(admin, "/metrics").await.1;
    let peak = status_field(pid, "VmHWM:");
    let grew = peak.saturating_sub(baseline);
    eprintln!(
        "{transport:?}: {STREAMS} non-reading clients ({} tunnels opened): windows at most \
         {:.1} MiB, lent at most {:.1} MiB, shed {}, RSS {baseline} KiB -> peak {peak} KiB \
         (+{} MiB)",
        army.tunnels.load(Ordering::Relaxed),
        most_windows / 1048576.0,
        most_lent / 1048576.0,
        metric_in(&page, "edge_tunnel_stalled_streams_shed_total "),
        grew / 1024
    );
    assert!(most_lent > 0.0, "stalled streams were lent credit: {page}");
    // Every window full, times what the server holds around the data per
    // tunnel, measured at 4-5 times the windows here (not quinn's GRO
    // batches sharing a buffer: with one buffer per datagram the growth
    // was 65 MiB against 77, benches/RESULTS.md); plus 64 MiB for the
    // relays, their sockets and the streams' state. The same formula
    // sizes the manifests (SECURITY.md).
    let bound = 5 * (BUDGET_MIB << 10) + 64 * 1024;
    assert!(
        grew <= bound,
        "the server grew {grew} KiB under the army, over {bound} KiB"
    );
    soldiers.abort_all();
    while soldiers.join_next().await.is_some() {}
    eventually(
        "lent credit given back",
        Duration::from_secs(30),
        || async {
            let page = http_get(admin, "/metrics").await.1;
            metric_in(&page, "edge_tunnel_stall_credit_bytes ") == 0.0
                && metric_in(&page, "edge_tunnel_streams_active ") == 0.0
        },
    )
    .await;
    for agent in agents {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_reading_client_army_stays_within_the_receive_budget_quic() {
    army(TransportChoice::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_reading_client_army_stays_within_the_receive_budget_h2() {
    army(TransportChoice::H2).await;
}
