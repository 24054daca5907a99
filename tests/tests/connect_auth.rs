//! Who may use the CONNECT ingress (#14): a token file on TCP (407 without
//! a valid `Proxy-Authorization`, Basic or Bearer, counted per name), a
//! Unix socket for a co-located apiserver, and the refusal to run an open
//! listener anywhere but loopback.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use e2e::{init_logging, targets, Pki, TestAgent, TestServer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

const NODE: &str = "edge-1";
const TOKEN: &str = "0123456789abcdef0123";

/// A server and an agent for `NODE` (127.0.0.1) allowed to reach `echo`;
/// `tune` changes the server's settings.
async fn tunnel(
    echo: SocketAddr,
    tune: impl FnOnce(&mut tunnel_server::ServerSettings),
) -> (Pki, TestServer, TestAgent) {
    init_logging();
    let pki = Pki::new();
    pki.issue_agent(NODE, &["127.0.0.1".parse().unwrap()]);
    let mut settings = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
    tune(&mut settings);
    let server = TestServer::start_with(settings).await;
    let allow = vec![format!("127.0.0.1:{}", echo.port())];
    let agent = TestAgent::start(TestAgent::config(&pki, NODE, server.addrs.quic, &allow));
    server.wait_for_agent(NODE, Duration::from_secs(10)).await;
    (pki, server, agent)
}

/// Sends a CONNECT with `extra` header lines; returns the status, the
/// head, and the stream (for the tunnel on 200).
async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    target: &str,
    extra: &str,
) -> (u16, String, S) {
    io.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(io.read(&mut byte).await.unwrap(), 1, "proxy closed");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, io)
}

async fn echoes<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    io.write_all(b"through the tunnel").await.unwrap();
    let mut back = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"through the tunnel");
}

fn basic(user_pass: &str) -> String {
    format!(
        "Proxy-Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    )
}

fn write_tokens(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_requests_need_a_token_from_the_file() {
    let echo = targets::echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &format!("# proxy clients\nprometheus:{TOKEN}\n"));
    let (_pki, server, agent) = tunnel(echo, |s| {
        s.connect_token_file = Some(tokens.clone());
    })
    .await;
    let proxy = server.connect_addr();
    let target = echo.to_string();
    let tcp = || async { TcpStream::connect(proxy).await.unwrap() };

    // No credential, a wrong one, an unknown name: 407, nothing dialed.
    let (status, head, _) = connect(tcp().await, &target, "").await;
    assert_eq!(status, 407, "{head}");
    assert!(
        head.contains("proxy-authenticate: Basic realm=\"edge-tunnel\""),
        "{head}"
    );
    for wrong in [
        basic(&format!("prometheus:{TOKEN}x")),
        basic(&format!("nobody:{TOKEN}")),
        "Proxy-Authorization: Bearer 0000000000000000000000\r\n".into(),
    ] {
        let (status, head, _) = connect(tcp().await, &target, &wrong).await;
        assert_eq!(status, 407, "{wrong}: {head}");
    }
    // Not even an unknown node is revealed without a credential.
    let (status, _, _) = connect(tcp().await, "edge-404:10250", "").await;
    assert_eq!(status, 407);
    assert_eq!(server.metric("edge_tunnel_dial_failures_total").await, 0.0);

    // Basic, as Prometheus sends for proxy_url: http://name:token@host.
    let (status, head, io) =
        connect(tcp().await, &target, &basic(&format!("prometheus:{TOKEN}"))).await;
    assert_eq!(status, 200, "{head}");
    echoes(io).await;
    // Bearer.
    let bearer = format!("Proxy-Authorization: Bearer {TOKEN}\r\n");
    let (status, _, io) = connect(tcp().await, &target, &bearer).await;
    assert_eq!(status, 200);
    echoes(io).await;
    let page = server.metrics().await;
    for line in [
        "edge_tunnel_connect_authorized_total{credential=\"token\",name=\"prometheus\"} 2",
        "edge_tunnel_connect_auth_failures_total{reason=\"missing\"} 2",
        "edge_tunnel_connect_auth_failures_total{reason=\"invalid\"} 3",
    ] {
        assert!(page.contains(line), "{line} in\n{page}");
    }

    // A new file takes effect without a restart; a broken one is refused
    // and the tokens before it stay.
    write_tokens(&tokens, "grafana:fedcba9876543210fedc\n");
    e2e::eventually("the new tokens apply", Duration::from_secs(10), || async {
        let (status, _, _) = connect(
            TcpStream::connect(proxy).await.unwrap(),
            &target,
            &basic("grafana:fedcba9876543210fedc"),
        )
        .await;
        status == 200
    })
    .await;
    let (status, _, _) =
        connect(tcp().await, &target, &basic(&format!("prometheus:{TOKEN}"))).await;
    assert_eq!(status, 407, "the old token is gone");
    write_tokens(&tokens, "not a token file\n");
    e2e::eventually(
        "the broken file is refused",
        Duration::from_secs(10),
        || async {
            server
                .metric("edge_tunnel_token_file_reloads_total{result=\"error\"}")
                .await
                >= 1.0
        },
    )
    .await;
    let (status, _, _) =
        connect(tcp().await, &target, &basic("grafana:fedcba9876543210fedc")).await;
    assert_eq!(status, 200, "the tokens before it stay in force");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_serves_connect_to_whom_its_mode_allows() {
    let echo = targets::echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("connect.sock");
    // A socket left by an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let (_pki, server, agent) = tunnel(echo, |s| {
        s.connect_uds = Some(sock.clone());
        s.connect_uds_mode = 0o660;
        // Tokens guard TCP only: the socket's permissions admit its peers.
        s.connect_token_file = None;
    })
    .await;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let io = UnixStream::connect(&sock).await.unwrap();
    let (status, head, io) = connect(io, &echo.to_string(), "").await;
    assert_eq!(status, 200, "{head}");
    echoes(io).await;
    assert!(server
        .metrics()
        .await
        .contains("edge_tunnel_connect_authorized_total{credential=\"unix\",name=\"\"} 1"));
    agent.stop().await;
}

#[tokio::test]
async fn a_file_in_the_way_of_the_socket_is_not_deleted() {
    init_logging();
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("connect.sock");
    std::fs::write(&path, "important").unwrap();
    let mut settings = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
    settings.connect_uds = Some(path.clone());
    let config = tunnel_server::ServerConfig::try_new(settings).unwrap();
    let e = tunnel_server::Server::bind(config).err().expect("refused");
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "important");
}
