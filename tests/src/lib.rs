//! Test harness for edge-tunnel's end-to-end tests: throw-away PKI, the real
//! server and agent started in-process on loopback, fake targets (echo,
//! TLS, streaming, WebSocket), a CONNECT client, and attack generators
//! ([`flood`], [`hostile`]).
//!
//! Everything binds port 0 and waits on conditions ([`eventually`]), never
//! on fixed sleeps.

pub mod flood;
pub mod hostile;
pub mod netns;
pub mod pki;
pub mod targets;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use pki::Pki;

/// Per-test setup: log subscriber (RUST_LOG controls it) and an open-file
/// limit high enough for a thousand relayed connections in one process.
pub fn init_logging() {
    let _ = rlimit::increase_nofile_limit(65_536);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running in-process tunnel-server.
pub struct TestServer {
    pub addrs: tunnel_server::BoundAddrs,
    pub shared: Arc<tunnel_server::Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Settings for a test server; [`TestServer::start_with`] checks them.
    pub fn config(pki: &Pki, listen: SocketAddr) -> tunnel_server::ServerSettings {
        let mut c = tunnel_server::ServerSettings::new(listen, pki.server_dir());
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        c.connect_listen = Some(any);
        c.transparent_listen = Some(any);
        c.admin_listen = Some(any);
        c.server_id = "test-server".into();
        // Tests that stop a server with tunnels open mean an abrupt stop;
        // tests/tests/drain.rs sets a grace.
        c.drain_grace = Duration::ZERO;
        // Agents on this machine have loopback addresses.
        c.addresses.allow_loopback = true;
        c
    }

    pub async fn start(pki: &Pki) -> TestServer {
        Self::start_with(Self::config(pki, "127.0.0.1:0".parse().unwrap())).await
    }

    pub async fn start_with(settings: tunnel_server::ServerSettings) -> TestServer {
        let config = tunnel_server::ServerConfig::try_new(settings).expect("valid test settings");
        // With port 0 the HTTP/2 listener takes the QUIC endpoint's port
        // number on TCP, which another test may hold: pick again. With a
        // fixed port (a restart in place) the previous server's UDP socket
        // is released by quinn's endpoint task a moment after it stopped.
        let mut attempts = 0;
        let server = loop {
            match tunnel_server::Server::bind(config.clone()) {
                Ok(s) => break s,
                Err(
                    tunnel_server::ServerError::Bind { .. }
                    | tunnel_server::ServerError::Endpoint(_),
                ) if attempts < 40 => {
                    attempts += 1;
                    if config.listen.port() != 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(e) => panic!("server binds: {e}"),
            }
        };
        let addrs = server.local_addrs();
        let shared = server.shared();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestServer {
            addrs,
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn connect_addr(&self) -> SocketAddr {
        self.addrs.connect.expect("CONNECT listener")
    }

    /// Waits until `node` is registered.
    pub async fn wait_for_agent(&self, node: &str, within: Duration) {
        let shared = self.shared.clone();
        let node = node.to_owned();
        eventually(&format!("agent {node} registered"), within, || {
            let ok = matches!(
                shared.registry.by_node(&node),
                tunnel_server::registry::Route::Agent(_)
            );
            async move { ok }
        })
        .await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        http_get(self.addrs.admin.unwrap(), "/metrics").await.1
    }

    /// Value of the metric line starting with `series` (name and labels).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Starts the shutdown (what SIGTERM does) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Whether the server's run has returned.
    pub fn has_stopped(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A running in-process tunnel-agent.
pub struct TestAgent {
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), tunnel_agent::AgentError>>>,
}

impl TestAgent {
    pub fn config(
        pki: &Pki,
        node: &str,
        server: SocketAddr,
        allow: &[String],
    ) -> tunnel_agent::AgentConfig {
        let mut c = tunnel_agent::AgentConfig::try_new(
            &server.to_string(),
            &pki.agent_dir(node),
            node,
            allow,
        )
        .expect("agent config");
        c.drain_grace = Duration::from_secs(10);
        c
    }

    pub fn start(config: tunnel_agent::AgentConfig) -> TestAgent {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tunnel_agent::run(config, async {
            let _ = stopped.await;
        }));
        TestAgent {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Asks the agent to drain and waits for it to exit.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("agent task")
                .expect("agent exits cleanly");
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Opens a tunnel through the CONNECT ingress. Returns the status code and,
/// on 200, the stream; otherwise the response body.
pub async fn connect_via(proxy: SocketAddr, target: &str) -> Result<TcpStream, (u16, String)> {
    let mut tcp = TcpStream::connect(proxy).await.expect("connect to proxy");
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Read the head byte by byte so nothing after it is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut byte)
            .await
            .unwrap();
        assert!(n == 1, "proxy closed during the response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    if status == 200 {
        return Ok(tcp);
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut body)
        .await
        .unwrap();
    Err((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Minimal HTTP/1.0 GET; returns status and body.
/// Writes `what` on a tunnel to an echo target and reads it back (within
/// 10 s).
pub async fn echo_round_trip(tcp: &mut TcpStream, what: &[u8]) {
    tcp.write_all(what).await.unwrap();
    let mut back = vec![0u8; what.len()];
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_exact(tcp, &mut back),
    )
    .await
    .expect("echo within 10 s")
    .unwrap();
    assert_eq!(back, what);
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut r = BufReader::new(tcp);
    let mut status = String::new();
    r.read_line(&mut status).await.unwrap();
    let code = status.split(' ').nth(1).unwrap().parse().unwrap();
    let mut rest = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut r, &mut rest)
        .await
        .unwrap();
    let body = rest
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// A temporary directory that lives as long as the test.
pub fn tempdir() -> PathBuf {
    tempfile::Builder::new()
        .prefix("edge-tunnel-test")
        .tempdir()
        .unwrap()
        .keep()
}

/// A loopback port nothing listens on now, and one this process has not
/// handed out before: the kernel may offer a port again once its listener
/// is closed, and a test that asks for three ports for one server must get
/// three (two equal ones make the server fail to bind, and the test waits
/// for a readiness that never comes).
pub fn free_port() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// A child process (a real binary under test), killed when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Value of the line of a `/metrics` page that starts with `series` (name
/// and labels, then a space); 0 when there is none.
pub fn metric_in(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
