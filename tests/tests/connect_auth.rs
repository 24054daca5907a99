//! Who may use the CONNECT ingress (#14): a token file on TCP (407 without
//! a valid `Proxy-Authorization`, Basic or Bearer, counted per name), TLS
//! with client certificates (real curl with `--proxy https://`), a Unix
//! socket for a co-located apiserver, and the refusal to run an open
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

/// One exchange through an open tunnel to the echo target.
async fn echo_once<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    io.write_all(b"still open").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut back))
        .await
        .expect("the echo within 10 s")
        .unwrap();
    assert_eq!(&back, b"still open");
}

/// Waits (bounded) for the proxy to reset the tunnel `io`.
async fn is_reset<S: AsyncRead + Unpin>(io: &mut S) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), io.read_to_end(&mut rest))
        .await
        .expect("the tunnel ends within 20 s");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "a reset, not a FIN (read {rest:?})"
    );
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

    // A tunnel open when its token is removed from the file is reset:
    // revoking a token ends what it opened, not only what comes next.
    let (status, _, mut held) =
        connect(tcp().await, &target, &basic(&format!("prometheus:{TOKEN}"))).await;
    assert_eq!(status, 200);
    echo_once(&mut held).await;

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
    is_reset(&mut held).await;
    assert_eq!(
        server
            .metric("edge_tunnel_revoked_tunnel_resets_total")
            .await,
        1.0
    );
    let grafana = basic("grafana:fedcba9876543210fedc");
    let (status, _, mut kept) = connect(tcp().await, &target, &grafana).await;
    assert_eq!(status, 200);
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
    // Neither a refused file nor a change that keeps its token touches a
    // tunnel.
    write_tokens(
        &tokens,
        "grafana:fedcba9876543210fedc\nops:ffffffffffffffffffff\n",
    );
    e2e::eventually(
        "the third file applies",
        Duration::from_secs(10),
        || async {
            server
                .metric("edge_tunnel_token_file_reloads_total{result=\"ok\"}")
                .await
                >= 2.0
        },
    )
    .await;
    echo_once(&mut kept).await;
    assert_eq!(
        server
            .metric("edge_tunnel_revoked_tunnel_resets_total")
            .await,
        1.0
    );
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
        .contains("edge_tunnel_connect_authorized_total{credential=\"unix\",name=\"uid 0\"} 1"));
    agent.stop().await;
    // The socket goes with the server; a successor's socket on the same
    // path would stay (the inode is checked).
    server.stop().await;
    assert!(!sock.exists(), "the socket outlived its server");
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

/// A plain-HTTP target that answers every request on a connection with
/// the request head it received, as the body.
async fn head_echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                loop {
                    let Ok(head) = read_head(&mut tcp).await else {
                        return;
                    };
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: keep-alive, x-private\r\nx-private: 1\r\n\r\n{head}",
                        head.len()
                    );
                    if tcp.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if io.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Sends one request on `io`, returns the status, the response head and
/// the body (by content-length).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    request: &str,
) -> (u16, String, String) {
    io.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(io).await.unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.unwrap();
    (status, head, String::from_utf8(body).unwrap())
}

/// Prometheus sends `GET http://edge-1:9100/metrics` to its proxy_url for
/// a plain-HTTP target: forwarded in origin form, keep-alive on the
/// client's connection, hop-by-hop and proxy fields not passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_http_requests_are_forwarded() {
    let target = head_echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &format!("prometheus:{TOKEN}\n"));
    let (_pki, server, agent) = tunnel(target, |s| {
        s.connect_token_file = Some(tokens.clone());
    })
    .await;
    let mut tcp = TcpStream::connect(server.connect_addr()).await.unwrap();
    let port = target.port();
    let auth = basic(&format!("prometheus:{TOKEN}"));
    for path in ["/metrics", "/metrics?again=1"] {
        let request = format!(
            "GET http://{NODE}:{port}{path} HTTP/1.1\r\nHost: {NODE}:{port}\r\n{auth}\
             Connection: keep-alive, x-hop\r\nx-hop: secret\r\nAccept: text/plain\r\n\r\n"
        );
        let (status, head, body) = exchange(&mut tcp, &request).await;
        assert_eq!(status, 200, "{head}{body}");
        assert!(
            body.starts_with(&format!("GET {path} HTTP/1.1\r\n")),
            "{body}"
        );
        let lower = body.to_ascii_lowercase();
        assert!(lower.contains(&format!("host: {NODE}:{port}")), "{body}");
        assert!(lower.contains("accept: text/plain"), "{body}");
        assert!(lower.contains("via: 1.1 edge-tunnel"), "{body}");
        // One tunnel per request: the target is asked to close after it.
        assert!(lower.contains("connection: close"), "{body}");
        for gone in ["proxy-authorization", "x-hop"] {
            assert!(!lower.contains(gone), "{gone} was forwarded: {body}");
        }
        assert!(!head.to_ascii_lowercase().contains("x-private"), "{head}");
    }
    // Without the token: 407, and nothing reaches the target.
    let (status, _, _) = exchange(
        &mut TcpStream::connect(server.connect_addr()).await.unwrap(),
        &format!("GET http://{NODE}:{port}/ HTTP/1.1\r\nHost: {NODE}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 407);
    // An https:// target is a CONNECT's business.
    let (status, _, body) = exchange(
        &mut TcpStream::connect(server.connect_addr()).await.unwrap(),
        &format!("GET https://{NODE}:{port}/ HTTP/1.1\r\nHost: {NODE}\r\n{auth}\r\n"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        server
            .metric("edge_tunnel_streams_total{ingress=\"forward\"}")
            .await,
        2.0
    );
    agent.stop().await;
}

/// curl with `args`; returns its exit code, stdout and stderr.
async fn curl(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// curl's flags for the ingress at `proxy` over TLS, verifying the
/// server's certificate, with the client certificate in `cert_dir`.
fn tls_proxy(pki: &Pki, proxy: SocketAddr, cert_dir: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        "--proxy".to_owned(),
        format!("https://{proxy}"),
        "--proxy-cacert".into(),
        pki.server_dir().join("ca.crt").display().to_string(),
    ];
    if let Some(dir) = cert_dir {
        args.extend([
            "--proxy-cert".into(),
            dir.join("tls.crt").display().to_string(),
            "--proxy-key".into(),
            dir.join("tls.key").display().to_string(),
        ]);
    }
    args
}

/// A CONNECT tunnel to `target` through the TLS listener at `proxy`, as
/// the client whose certificate is in `client`.
async fn tls_tunnel(
    proxy: SocketAddr,
    client: &Path,
    target: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let dir = certs::CertDir::load(client).unwrap();
    let tls = certs::tls::client_config(&dir, b"http/1.1").unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let io = connector.connect(name, tcp).await.unwrap();
    let (status, head, io) = connect(io, &format!("{NODE}:{}", target.port()), "").await;
    assert_eq!(status, 200, "{head}");
    io
}

/// `--connect-tls-listen` with `--connect-client-ca`: TLS, proxying only
/// for a client certificate chaining to that CA, and of the tunnel CA's
/// certificates only a CONNECT client's (never an agent's). The plain
/// listener beside it keeps serving token clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_need_a_connect_client_certificate() {
    let target = head_echo_server().await;
    let deny_dir = tempfile::tempdir().unwrap();
    let deny = deny_dir.path().join("deny-list");
    std::fs::write(&deny, "# nobody yet\n").unwrap();
    let (pki, server, agent) = tunnel(target, |s| {
        s.connect_tls_listen = Some("127.0.0.1:0".parse().unwrap());
        // The tunnel CA: agent certificates chain to it too.
        s.connect_client_ca = Some(s.cert_dir.join("ca.crt"));
        s.deny_list = Some(deny.clone());
        s.reload_interval = Duration::from_millis(200);
    })
    .await;
    let apiserver = pki.issue_connect_client("kube-apiserver");
    let proxy = server.addrs.connect_tls.expect("TLS CONNECT listener");
    let url = format!("http://{NODE}:{}/tls", target.port());
    let run = |cert: Option<std::path::PathBuf>, tunnel: bool| {
        let mut args = tls_proxy(&pki, proxy, cert.as_deref());
        if tunnel {
            args.push("--proxytunnel".into());
        }
        args.extend(["-w".into(), "\n%{http_code}".into(), url.clone()]);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&args).await
        }
    };

    // CONNECT (curl -p) and an absolute-form request, both over TLS.
    for tunnel in [true, false] {
        let (code, out, err) = run(Some(apiserver.clone()), tunnel).await;
        assert_eq!(code, 0, "tunnel={tunnel}: {err}");
        assert!(out.starts_with("GET /tls HTTP/1.1"), "{out}");
        assert!(out.ends_with("\n200"), "{out}");
    }
    // No client certificate: the handshake fails, nothing is proxied.
    let (code, out, _) = run(None, false).await;
    assert_ne!(code, 0, "proxied without a certificate: {out}");
    // A certificate from another CA: the same.
    let other = Pki::new();
    other.issue_connect_client("kube-apiserver");
    let foreign = other.dir.path().join("connect-clients/kube-apiserver");
    let (code, out, _) = run(Some(foreign), false).await;
    assert_ne!(code, 0, "proxied for a foreign certificate: {out}");
    // An agent's certificate chains to the CA, but may not use the ingress.
    let (code, out, _) = run(Some(pki.agent_dir(NODE)), false).await;
    assert_eq!(code, 0);
    assert!(out.ends_with("\n403"), "{out}");
    assert!(out.contains("tunnel-certs connect-client"), "{out}");
    assert!(!out.contains("GET /tls"), "{out}");

    let page = server.metrics().await;
    for (series, at_least) in [
        (
            "edge_tunnel_connect_authorized_total{credential=\"certificate\",name=\"edge-tunnel:connect:kube-apiserver\"}",
            2.0,
        ),
        ("edge_tunnel_connect_auth_failures_total{reason=\"tls_handshake\"}", 2.0),
        ("edge_tunnel_connect_auth_failures_total{reason=\"certificate\"}", 1.0),
    ] {
        let value = e2e::metric_in(&page, series);
        assert!(value >= at_least, "{series} = {value}, want {at_least}+ in\n{page}");
    }
    assert!(!page.contains("credential=\"none\""), "{page}");
    // Two tunnels open over TLS: the apiserver's, and Prometheus's.
    let prometheus = pki.issue_connect_client("prometheus");
    let mut held = tls_tunnel(proxy, &apiserver, target).await;
    let mut kept = tls_tunnel(proxy, &prometheus, target).await;
    let get = "GET /held HTTP/1.1\r\nHost: x\r\n\r\n";
    for io in [&mut held, &mut kept] {
        assert_eq!(exchange(io, get).await.0, 200);
    }
    // A revoked client certificate (a leaked DNAT helper's, say) is refused
    // from the next request on, as a revoked agent is, and the tunnels it
    // opened are reset; other clients' stay.
    let leaf = certs::files::read_certs(&apiserver.join("tls.crt")).unwrap();
    let serial = certs::Identity::from_der(&leaf[0]).unwrap().serial;
    std::fs::write(&deny, format!("serial={serial}\n")).unwrap();
    e2e::eventually(
        "the revoked certificate is refused",
        Duration::from_secs(20),
        || {
            let run = &run;
            let apiserver = apiserver.clone();
            async move {
                let (code, out, _) = run(Some(apiserver), false).await;
                code == 0 && out.ends_with("\n403") && out.contains("revoked")
            }
        },
    )
    .await;
    assert!(
        server
            .metric("edge_tunnel_connect_auth_failures_total{reason=\"revoked\"}")
            .await
            >= 1.0
    );
    is_reset(&mut held).await;
    assert_eq!(exchange(&mut kept, get).await.0, 200);
    assert_eq!(
        server
            .metric("edge_tunnel_revoked_tunnel_resets_total")
            .await,
        1.0
    );
    // Plain HTTP on the TLS port gets nothing either.
    let mut plain = TcpStream::connect(proxy).await.unwrap();
    plain
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"),
        "{answer:?}"
    );
    agent.stop().await;
}

/// With a token file too, the client certificate is optional: a TLS
/// client without one must send a token (Prometheus can use an https://
/// proxy_url with credentials), one with an accepted certificate need not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_without_a_certificate_need_a_token() {
    let target = head_echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &format!("prometheus:{TOKEN}\n"));
    let (pki, server, agent) = tunnel(target, |s| {
        s.connect_tls_listen = Some("127.0.0.1:0".parse().unwrap());
        s.connect_client_ca = Some(s.cert_dir.join("ca.crt"));
        s.connect_token_file = Some(tokens.clone());
    })
    .await;
    let proxy = server.addrs.connect_tls.expect("TLS CONNECT listener");
    let url = format!("http://{NODE}:{}/opt", target.port());
    let with = |extra: &[&str], cert: Option<&Path>| {
        let mut args = tls_proxy(&pki, proxy, cert);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["-w".into(), "\n%{http_code}".into(), url.clone()]);
        args
    };
    let user = format!("prometheus:{TOKEN}");
    for (args, want) in [
        (with(&["--proxy-user", &user], None), "200"),
        (with(&[], None), "407"),
        (
            with(&["--proxy-user", "prometheus:wrong-token-wrong"], None),
            "407",
        ),
        (
            with(&[], Some(&pki.issue_connect_client("kube-apiserver"))),
            "200",
        ),
    ] {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = curl(&argv).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.ends_with(&format!("\n{want}")), "{args:?}: {out}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn a_bad_client_ca_file_is_named() {
    init_logging();
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("client-ca.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let mut settings = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
    settings.connect_tls_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.connect_client_ca = Some(bad.clone());
    let config = tunnel_server::ServerConfig::try_new(settings).unwrap();
    let e = tunnel_server::Server::bind(config).err().expect("refused");
    assert!(e.to_string().contains("--connect-client-ca"), "{e}");
    assert!(e.to_string().contains("client-ca.pem"), "{e}");
}

/// kube-apiserver's egress selector and `curl --unix-socket` use the
/// socket: here an absolute-form request through it (curl sends the
/// proxy form with `--request-target`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_an_http_target_through_the_unix_socket() {
    let target = head_echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("connect.sock");
    let (_pki, server, agent) = tunnel(target, |s| {
        s.connect_uds = Some(sock.clone());
    })
    .await;
    let url = format!("http://{NODE}:{}/uds", target.port());
    let sock = sock.display().to_string();
    let (code, out, err) = curl(&[
        "--unix-socket",
        &sock,
        "--request-target",
        &url,
        "-w",
        "\n%{http_code}",
        &url,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("GET /uds HTTP/1.1"), "{out}");
    assert!(out.ends_with("\n200"), "{out}");
    assert_eq!(
        server
            .metric("edge_tunnel_streams_total{ingress=\"forward\"}")
            .await,
        1.0
    );
    agent.stop().await;
}
