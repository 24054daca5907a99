//! Certificates that look after themselves (#16): enrollment with a
//! bootstrap token and a CA pin, the refusals, renewal (across a server
//! restart, with an old stream flowing), the server's certificate
//! replaced on disk, a broken file refused, a revoked node disconnected,
//! an expired agent certificate refused.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use certs::bootstrap::{BootstrapToken, Subject, TokenRecord, TokensFile};
use e2e::{
    connect_via, echo_round_trip, eventually, http_get, init_logging, targets, Pki, TestAgent,
    TestServer,
};
use tunnel_agent::enroll::{Bootstrap, TokenSource};
use tunnel_agent::AgentConfig;

const LOOPBACK: &str = "127.0.0.1";

/// The signing CA and a tokens file, next to the test PKI.
struct Enrollment {
    ca_dir: PathBuf,
    tokens: PathBuf,
    pin: String,
}

impl Enrollment {
    fn new(pki: &Pki) -> Enrollment {
        let ca_dir = pki.dir.path().join("ca");
        let pem = pki.ca.pem();
        std::fs::create_dir_all(&ca_dir).unwrap();
        std::fs::write(ca_dir.join("ca.crt"), &pem.cert).unwrap();
        std::fs::write(ca_dir.join("ca.key"), &pem.key).unwrap();
        let tokens = pki.dir.path().join("tokens");
        TokensFile::default().save(&tokens).unwrap();
        let ca = certs::files::parse_certs(pem.cert.as_bytes(), Path::new("ca")).unwrap();
        let pin = certs::bootstrap::ca_cert_hash(&ca[0]).unwrap();
        Enrollment {
            ca_dir,
            tokens,
            pin,
        }
    }

    /// Records a token for `subject`, valid for `ttl` (negative: expired
    /// already) and `uses` enrollments.
    fn token(&self, subject: Subject, ttl: i64, uses: u32) -> String {
        let token = BootstrapToken::generate();
        let mut file = TokensFile::load(&self.tokens).unwrap();
        file.records.push(TokenRecord {
            id: token.id.clone(),
            hash: token.secret_hash(),
            subject,
            expires: (now() + ttl) as u64,
            uses,
            used: 0,
            revoked: false,
        });
        file.save(&self.tokens).unwrap();
        token.to_string()
    }

    fn server(&self, pki: &Pki, validity: Duration) -> tunnel_server::ServerSettings {
        let mut s = TestServer::config(pki, "127.0.0.1:0".parse().unwrap());
        s.enroll_ca_dir = Some(self.ca_dir.clone());
        s.enroll_tokens_file = Some(self.tokens.clone());
        s.enroll_validity = validity;
        s.reload_interval = Duration::from_secs(1);
        s
    }

    /// An agent for `node` that enrolls into a fresh `--cert-dir`.
    fn agent(&self, pki: &Pki, node: &str, server: SocketAddr, token: &str) -> AgentConfig {
        self.agent_with(pki, node, server, token, &[LOOPBACK.parse().unwrap()])
    }

    fn agent_with(
        &self,
        pki: &Pki,
        node: &str,
        server: SocketAddr,
        token: &str,
        addresses: &[IpAddr],
    ) -> AgentConfig {
        let dir = pki
            .dir
            .path()
            .join("enrolled")
            .join(format!("{node}-{}", fastrand::u32(..)));
        let mut c = AgentConfig::without_certificate(&server.to_string(), &dir, node, &[]).unwrap();
        c.server_name = Some("localhost".into());
        c.drain_grace = Duration::from_secs(5);
        c.bootstrap = Some(Bootstrap {
            token: TokenSource::Value(token.to_owned()),
            ca_cert_hash: Some(self.pin.clone()),
            addresses: addresses.to_vec(),
        });
        c
    }

    fn used(&self, token: &str) -> u32 {
        let id = token.split('.').next().unwrap();
        TokensFile::load(&self.tokens)
            .unwrap()
            .find(id)
            .unwrap()
            .used
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn identity_in(dir: &Path) -> certs::Identity {
    let certs = certs::files::read_certs(&dir.join("tls.crt")).unwrap();
    certs::Identity::from_der(&certs[0]).unwrap()
}

/// An enrolling server and the TLS of a peer without a certificate that
/// trusts it (the PKI must outlive the server).
async fn enrolling_server() -> (Pki, TestServer, rustls::ClientConfig) {
    init_logging();
    let pki = Pki::new();
    let enrollment = Enrollment::new(&pki);
    let server = TestServer::start_with(enrollment.server(&pki, Duration::from_secs(86_400))).await;
    let ca = certs::files::parse_certs(pki.ca.pem().cert.as_bytes(), Path::new("ca")).unwrap();
    let tls =
        certs::tls::enroll_client_config(&certs::tls::EnrollTrust::Roots(ca), proto::ALPN).unwrap();
    (pki, server, tls)
}

/// A server issuing 12 s certificates (renewed about 8 s after issue),
/// with an empty deny-list: the server and the list's path.
async fn with_deny_list(pki: &Pki, enrollment: &Enrollment) -> (TestServer, PathBuf) {
    let deny = pki.dir.path().join("deny-list");
    std::fs::write(&deny, "# nobody yet\n").unwrap();
    let mut settings = enrollment.server(pki, Duration::from_secs(12));
    settings.deny_list = Some(deny.clone());
    (TestServer::start_with(settings).await, deny)
}

/// Waits (bounded) until `node` is no longer registered and its
/// reconnect was refused as revoked.
async fn disconnected_and_refused(server: &TestServer, node: &str) {
    eventually(
        "the revoked node disconnected",
        Duration::from_secs(15),
        || {
            let gone = registered_serial(server, node).is_none();
            async move { gone }
        },
    )
    .await;
    eventually("its reconnect refused", Duration::from_secs(20), || async {
        server
            .metric("edge_tunnel_registration_refusals_total{reason=\"revoked\"}")
            .await
            >= 1.0
    })
    .await;
}

fn registered_serial(server: &TestServer, node: &str) -> Option<String> {
    match server.shared.registry.by_node(node) {
        tunnel_server::registry::Route::Agent(a) => Some(a.serial.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_a_token_and_a_pin() {
    init_logging();
    let echo = targets::echo_server().await;
    let pki = Pki::new();
    let enrollment = Enrollment::new(&pki);
    let server =
        TestServer::start_with(enrollment.server(&pki, Duration::from_secs(30 * 86_400))).await;
    let token = enrollment.token(Subject::Node("edge-1".into()), 3600, 1);
    let mut config = enrollment.agent(&pki, "edge-1", server.addrs.quic, &token);
    config.allow = Some({
        let mut a = tunnel_agent::allow::AllowList::default();
        a.add_entry(&format!("{LOOPBACK}:{}", echo.port())).unwrap();
        a
    });
    let dir = config.cert_dir.clone();
    let agent = TestAgent::start(config);
    server
        .wait_for_agent("edge-1", Duration::from_secs(15))
        .await;

    // What it was issued: its node, its address, client auth, 30 days,
    // the key private to it.
    let identity = identity_in(&dir);
    assert_eq!(identity.common_name, "edge-1");
    assert_eq!(
        identity.addresses,
        vec![LOOPBACK.parse::<IpAddr>().unwrap()]
    );
    assert!(identity.is_client_certificate());
    assert!(!identity.usage.unwrap().server_auth);
    let days = (identity.not_after - now()) / 86_400;
    assert!((29..=30).contains(&days), "{days} days");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("tls.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(enrollment.used(&token), 1);
    assert_eq!(
        server
            .metric("edge_tunnel_enrollments_total{result=\"issued\"}")
            .await,
        1.0
    );

    // And it serves.
    let mut tcp = connect_via(
        server.connect_addr(),
        &format!("{LOOPBACK}:{}", echo.port()),
    )
    .await
    .expect("tunnel through the enrolled agent");
    echo_round_trip(&mut tcp, b"enrolled").await;

    // Nobody else gets a certificate for a node that is connected, not
    // even with a token that allows its name.
    let fleet = enrollment.token(Subject::Pattern("edge-*".into()), 3600, 10);
    let config = enrollment.agent(&pki, "edge-1", server.addrs.quic, &fleet);
    let bootstrap = config.bootstrap.clone().unwrap();
    let err = tunnel_agent::enroll::enroll(&config, &bootstrap)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("connected"), "{err}");
    assert_eq!(enrollment.used(&fleet), 0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_go_to_the_state_file_when_given() {
    init_logging();
    let pki = Pki::new();
    let enrollment = Enrollment::new(&pki);
    let state = pki.dir.path().join("state");
    let mut settings = enrollment.server(&pki, Duration::from_secs(86_400));
    settings.enroll_state_file = Some(state.clone());
    let server = TestServer::start_with(settings).await;
    let token = enrollment.token(Subject::Pattern("edge-*".into()), 3600, 2);
    let tokens_before = std::fs::read(&enrollment.tokens).unwrap();
    for (node, ok) in [("edge-1", true), ("edge-2", true), ("edge-3", false)] {
        let config = enrollment.agent(&pki, node, server.addrs.quic, &token);
        let bootstrap = config.bootstrap.clone().unwrap();
        let result = tunnel_agent::enroll::enroll(&config, &bootstrap).await;
        assert_eq!(
            result.is_ok(),
            ok,
            "{node}: {:?}",
            result.err().map(|e| e.to_string())
        );
    }
    // The tokens file (a read-only Secret in a cluster) is untouched.
    assert_eq!(std::fs::read(&enrollment.tokens).unwrap(), tokens_before);
    let id = token.split('.').next().unwrap();
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.lines().any(|l| l == format!("{id} 2")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_enrollments_are_refused_with_a_reason() {
    init_logging();
    let pki = Pki::new();
    let enrollment = Enrollment::new(&pki);
    let mut settings = enrollment.server(&pki, Duration::from_secs(86_400));
    // Edge addresses must be in 198.18.0.0/24 (loopback stays allowed so
    // the other cases reach the token check).
    settings.addresses.ranges = vec!["198.18.0.0/24".parse().unwrap()];
    settings.addresses.allow_loopback = false;
    let server = TestServer::start_with(settings).await;
    let quic = server.addrs.quic;
    let edge: IpAddr = "198.18.0.7".parse().unwrap();
    let attempt = |config: AgentConfig| async move {
        let bootstrap = config.bootstrap.clone().unwrap();
        tunnel_agent::enroll::enroll(&config, &bootstrap)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };

    // Reuse: one use, used.
    let once = enrollment.token(Subject::Node("edge-1".into()), 3600, 1);
    let config = enrollment.agent_with(&pki, "edge-1", quic, &once, &[edge]);
    let bootstrap = config.bootstrap.clone().unwrap();
    tunnel_agent::enroll::enroll(&config, &bootstrap)
        .await
        .expect("first use");
    let err = attempt(enrollment.agent_with(&pki, "edge-1", quic, &once, &[edge])).await;
    assert!(err.contains("used"), "{err}");

    // Expired.
    let expired = enrollment.token(Subject::Node("edge-1".into()), -10, 1);
    let err = attempt(enrollment.agent_with(&pki, "edge-1", quic, &expired, &[edge])).await;
    assert!(err.contains("expired"), "{err}");

    // A pattern the node does not match.
    let stores = enrollment.token(Subject::Pattern("store-*".into()), 3600, 5);
    let err = attempt(enrollment.agent_with(&pki, "edge-1", quic, &stores, &[edge])).await;
    assert!(err.contains("node") && err.contains("edge-1"), "{err}");
    // ... while one that does gets in.
    let config = enrollment.agent_with(&pki, "store-12", quic, &stores, &[edge]);
    let bootstrap = config.bootstrap.clone().unwrap();
    tunnel_agent::enroll::enroll(&config, &bootstrap)
        .await
        .expect("a node the pattern matches");

    // A CSR for another node than the token's.
    let for_edge_2 = enrollment.token(Subject::Node("edge-2".into()), 3600, 1);
    let err = attempt(enrollment.agent_with(&pki, "edge-1", quic, &for_edge_2, &[edge])).await;
    assert!(err.contains("edge-1"), "{err}");
    assert_eq!(enrollment.used(&for_edge_2), 0, "a refusal uses nothing");

    // An address outside the allowed edge range.
    let outside = enrollment.token(Subject::Node("edge-3".into()), 3600, 1);
    let err = attempt(enrollment.agent_with(
        &pki,
        "edge-3",
        quic,
        &outside,
        &["10.99.0.1".parse().unwrap()],
    ))
    .await;
    assert!(err.contains("10.99.0.1"), "{err}");
    assert_eq!(enrollment.used(&outside), 0);

    // A wrong secret.
    let good = enrollment.token(Subject::Node("edge-4".into()), 3600, 1);
    let (id, _) = good.split_once('.').unwrap();
    let forged = format!("{id}.0000000000000000");
    let err = attempt(enrollment.agent_with(&pki, "edge-4", quic, &forged, &[edge])).await;
    assert!(err.contains("secret") || err.contains("token"), "{err}");

    // A server that does not present the pinned CA: nothing is sent.
    let mut config = enrollment.agent_with(&pki, "edge-4", quic, &good, &[edge]);
    config.bootstrap.as_mut().unwrap().ca_cert_hash = Some(format!("sha256:{}", "ab".repeat(32)));
    let err = attempt(config).await;
    assert!(err.contains("ca-cert-hash"), "{err}");
    assert_eq!(enrollment.used(&good), 0);

    let page = server.metrics().await;
    for label in [
        "used_up",
        "expired",
        "node_not_allowed",
        "address_not_allowed",
        "bad_secret",
    ] {
        let series = format!("edge_tunnel_enrollments_total{{result=\"{label}\"}}");
        assert!(e2e::metric_in(&page, &series) >= 1.0, "{series} in\n{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_old_streams_and_survives_a_server_restart() {
    init_logging();
    let echo = targets::echo_server().await;
    let pki = Pki::new();
    let enrollment = Enrollment::new(&pki);
    // 30 s certificates: renewed about 19 s after issue.
    let settings = enrollment.server(&pki, Duration::from_secs(30));
    let server = TestServer::start_with(settings.clone()).await;
    let token = enrollment.token(Subject::Node("edge-1".into()), 3600, 1);
    let mut config = enrollment.agent(&pki, "edge-1", server.addrs.quic, &token);
    config.allow = Some({
        let mut a = tunnel_agent::allow::AllowList::default();
        a.add_entry(&format!("{LOOPBACK}:{}", echo.port())).unwrap();
        a
    });
    let dir = config.cert_dir.clone();
    let agent = TestAgent::start(config);
    server
        .wait_for_agent("edge-1", Duration::from_secs(15))
        .await;
    let first = identity_in(&dir);
    assert_eq!(
        registered_serial(&server, "edge-1"),
        Some(first.serial.clone())
    );
    let target = format!("{LOOPBACK}:{}", echo.port());
    let mut old_stream = connect_via(server.connect_addr(), &target).await.unwrap();
    echo_round_trip(&mut old_stream, b"before renewal").await;

    // Renewed on disk, over a connection of its own ...
    eventually("the certificate renewed", Duration::from_secs(30), || {
        let serial = identity_in(&dir).serial;
        let first = first.serial.clone();
        async move { serial != first }
    })
    .await;
    let second = identity_in(&dir);
    assert!(second.not_after > first.not_after);
    assert_eq!(
        server
            .metric("edge_tunnel_renewals_total{result=\"issued\"}")
            .await,
        1.0
    );
    // ... the agent moves to a new connection with it (new tunnels go
    // there) ...
    eventually(
        "registered with the renewed certificate",
        Duration::from_secs(10),
        || {
            let serial = registered_serial(&server, "edge-1");
            let second = second.serial.clone();
            async move { serial == Some(second) }
        },
    )
    .await;
    let mut new_stream = connect_via(server.connect_addr(), &target).await.unwrap();
    echo_round_trip(&mut new_stream, b"on the new connection").await;
    // ... while the stream on the old connection keeps flowing.
    echo_round_trip(&mut old_stream, b"after renewal").await;

    // When the old certificate expires, the old connection goes, with
    // what still ran on it; the new one stays.
    eventually(
        "the old connection closed at its certificate's expiry",
        Duration::from_secs(30),
        || {
            let server = &server;
            async move {
                server
                    .metric("edge_tunnel_agents_disconnected_total{reason=\"expired\"}")
                    .await
                    >= 1.0
            }
        },
    )
    .await;
    assert_eq!(
        registered_serial(&server, "edge-1"),
        Some(second.serial.clone())
    );
    echo_round_trip(&mut new_stream, b"still").await;

    // A restarted server (same CA, nothing else kept) renews it too.
    let mut settings = settings;
    settings.listen = server.addrs.quic;
    settings.h2_listen = server.addrs.h2;
    server.stop().await;
    let server = TestServer::start_with(settings).await;
    let before = identity_in(&dir).serial;
    eventually(
        "renewed by the restarted server",
        Duration::from_secs(30),
        || {
            let serial = identity_in(&dir).serial;
            let before = before.clone();
            async move { serial != before }
        },
    )
    .await;
    server
        .wait_for_agent("edge-1", Duration::from_secs(30))
        .await;
    let mut tcp = connect_via(server.connect_addr(), &target).await.unwrap();
    echo_round_trip(&mut tcp, b"after restart").await;
    agent.stop().await;
}

/// The serial of the certificate the server presents on its HTTP/2 port.
async fn presented_serial(pki: &Pki, addr: SocketAddr) -> String {
    let dir = pki.issue_agent("probe", &[LOOPBACK.parse().unwrap()]);
    let cert_dir = certs::CertDir::load(&dir).unwrap();
    let tls = certs::tls::client_config(&cert_dir, proto::ALPN_H2).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.expect("TLS handshake");
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    certs::Identity::from_der(&leaf).unwrap().serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificate_is_reloaded_and_a_broken_one_refused() {
    init_logging();
    let echo = targets::echo_server().await;
    let pki = Pki::new();
    pki.issue_agent("edge-1", &[LOOPBACK.parse().unwrap()]);
    let mut settings = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
    settings.reload_interval = Duration::from_secs(1);
    let server = TestServer::start_with(settings).await;
    let h2 = server.addrs.h2.unwrap();
    let config = TestAgent::config(
        &pki,
        "edge-1",
        server.addrs.quic,
        &[format!("{LOOPBACK}:{}", echo.port())],
    );
    let agent = TestAgent::start(config);
    server
        .wait_for_agent("edge-1", Duration::from_secs(10))
        .await;
    let agent_id = match server.shared.registry.by_node("edge-1") {
        tunnel_server::registry::Route::Agent(a) => a.id,
        _ => unreachable!(),
    };
    let target = format!("{LOOPBACK}:{}", echo.port());
    let mut stream = connect_via(server.connect_addr(), &target).await.unwrap();
    echo_round_trip(&mut stream, b"before").await;
    let old = presented_serial(&pki, h2).await;

    // A new server certificate, written the way a Secret update lands.
    let new = pki
        .ca
        .issue_server(
            "tunnel-server",
            &["localhost".into()],
            &[LOOPBACK.parse().unwrap()],
            2,
        )
        .unwrap();
    let dir = pki.server_dir();
    certs::files::write_atomic(&dir.join("tls.key"), new.key.as_bytes(), 0o600).unwrap();
    certs::files::write_atomic(&dir.join("tls.crt"), new.cert.as_bytes(), 0o644).unwrap();
    let new_serial = {
        let c = certs::files::parse_certs(new.cert.as_bytes(), Path::new("new")).unwrap();
        certs::Identity::from_der(&c[0]).unwrap().serial
    };
    assert_ne!(old, new_serial);
    eventually(
        "new handshakes present the new certificate",
        Duration::from_secs(10),
        || {
            let pki = &pki;
            let new_serial = new_serial.clone();
            async move { presented_serial(pki, h2).await == new_serial }
        },
    )
    .await;
    // The live connection and its stream are untouched.
    echo_round_trip(&mut stream, b"after").await;
    match server.shared.registry.by_node("edge-1") {
        tunnel_server::registry::Route::Agent(a) => assert_eq!(a.id, agent_id),
        _ => panic!("the agent's connection went"),
    }

    // A broken file is refused; the certificate in use stays.
    std::fs::write(dir.join("tls.crt"), "not a certificate").unwrap();
    eventually("the broken file refused", Duration::from_secs(10), || {
        let server = &server;
        async move {
            server
                .metric("edge_tunnel_certificate_reloads_total{result=\"error\"}")
                .await
                >= 1.0
        }
    })
    .await;
    assert_eq!(presented_serial(&pki, h2).await, new_serial);
    echo_round_trip(&mut stream, b"still").await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_disconnected_and_an_expired_one_refused() {
    init_logging();
    let pki = Pki::new();
    let enrollment = Enrollment::new(&pki);
    let (server, deny) = with_deny_list(&pki, &enrollment).await;

    // Revocation: a node on the deny-list is closed within seconds and
    // refused when it comes back.
    let token = enrollment.token(Subject::Node("edge-1".into()), 3600, 1);
    let revoked = TestAgent::start(enrollment.agent(&pki, "edge-1", server.addrs.quic, &token));
    server
        .wait_for_agent("edge-1", Duration::from_secs(15))
        .await;
    std::fs::write(&deny, "node=edge-1\n").unwrap();
    disconnected_and_refused(&server, "edge-1").await;
    assert!(registered_serial(&server, "edge-1").is_none());
    revoked.stop().await;

    // Expiry: an agent that does not renew is closed when its certificate
    // expires, and its reconnect fails the handshake.
    let token = enrollment.token(Subject::Node("edge-2".into()), 3600, 1);
    let mut config = enrollment.agent(&pki, "edge-2", server.addrs.quic, &token);
    config.renew = false;
    config.bootstrap = None;
    // Enroll by hand, so nothing re-enrolls after expiry.
    let bootstrap = enrollment
        .agent(&pki, "edge-2", server.addrs.quic, &token)
        .bootstrap
        .unwrap();
    tunnel_agent::enroll::enroll(&config, &bootstrap)
        .await
        .unwrap();
    let expiring = TestAgent::start(config);
    server
        .wait_for_agent("edge-2", Duration::from_secs(15))
        .await;
    eventually(
        "the expired agent disconnected",
        Duration::from_secs(30),
        || {
            let gone = registered_serial(&server, "edge-2").is_none();
            async move { gone }
        },
    )
    .await;
    assert!(
        server
            .metric("edge_tunnel_agents_disconnected_total{reason=\"expired\"}")
            .await
            >= 1.0
    );
    let failures = |page: &str| {
        e2e::metric_in(
            page,
            "edge_tunnel_handshake_failures_total{transport=\"quic\",reason=\"tls\"}",
        ) + e2e::metric_in(
            page,
            "edge_tunnel_handshake_failures_total{transport=\"h2\",reason=\"tls\"}",
        )
    };
    let before = failures(&server.metrics().await);
    eventually(
        "its reconnects fail the handshake",
        Duration::from_secs(30),
        || {
            let server = &server;
            async move { failures(&server.metrics().await) > before }
        },
    )
    .await;
    assert!(registered_serial(&server, "edge-2").is_none());
    expiring.stop().await;
}

/// A certificate stolen from an enrolled node can be renewed into new
/// serials nobody else knows, so a `serial=` line for the stolen one does
/// not stop its holder. Every certificate of one enrollment carries the
/// same lineage, renewals included, and `lineage=ID` refuses them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lineage_on_the_deny_list_refuses_every_renewal_of_an_enrollment() {
    init_logging();
    let pki = Pki::new();
    let enrollment = Enrollment::new(&pki);
    let (server, deny) = with_deny_list(&pki, &enrollment).await;
    let token = enrollment.token(Subject::Node("edge-1".into()), 3600, 1);
    let config = enrollment.agent(&pki, "edge-1", server.addrs.quic, &token);
    let dir = config.cert_dir.clone();
    let agent = TestAgent::start(config);
    server
        .wait_for_agent("edge-1", Duration::from_secs(15))
        .await;
    let first = identity_in(&dir);
    let lineage = first
        .lineage
        .clone()
        .expect("an enrolled certificate has a lineage");
    let listed = http_get(server.addrs.admin.unwrap(), "/v1/agents").await.1;
    assert!(listed.contains(&lineage), "{listed}");
    eventually("the certificate renewed", Duration::from_secs(30), || {
        let serial = identity_in(&dir).serial;
        let first = first.serial.clone();
        async move { serial != first }
    })
    .await;
    let renewed = identity_in(&dir);
    assert_eq!(renewed.lineage.as_deref(), Some(lineage.as_str()));
    eventually("the renewal registered", Duration::from_secs(15), || {
        let serial = registered_serial(&server, "edge-1");
        let want = renewed.serial.clone();
        async move { serial == Some(want) }
    })
    .await;
    // The first serial alone stops nothing that was renewed from it ...
    std::fs::write(&deny, format!("serial={}\n", first.serial)).unwrap();
    let reloads = "edge_tunnel_certificate_reloads_total{result=\"ok\"}";
    let before = server.metric(reloads).await;
    eventually("the deny-list reloaded", Duration::from_secs(15), || {
        let server = &server;
        async move { server.metric(reloads).await > before }
    })
    .await;
    assert!(registered_serial(&server, "edge-1").is_some());
    // ... its lineage stops all of them.
    std::fs::write(&deny, format!("lineage={lineage}\n")).unwrap();
    disconnected_and_refused(&server, "edge-1").await;
    agent.stop().await;
}

/// Removing a CA from the server's `ca.crt` is how every agent of that CA
/// is revoked at once: the agents connected before are closed within a
/// reload interval (their certificates checked again against the new
/// bundle), not only refused when they reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_its_ca_from_ca_crt_disconnects_a_connected_agent() {
    init_logging();
    let pki = Pki::new();
    pki.issue_agent("edge-1", &[LOOPBACK.parse().unwrap()]);
    let mut settings = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
    settings.reload_interval = Duration::from_secs(1);
    let server = TestServer::start_with(settings).await;
    let agent = TestAgent::start(TestAgent::config(&pki, "edge-1", server.addrs.quic, &[]));
    server
        .wait_for_agent("edge-1", Duration::from_secs(15))
        .await;
    // ca.crt now trusts another CA only.
    let other = Pki::new();
    std::fs::write(pki.server_dir().join("ca.crt"), other.ca.pem().cert).unwrap();
    eventually("the agent disconnected", Duration::from_secs(15), || {
        let gone = registered_serial(&server, "edge-1").is_none();
        async move { gone }
    })
    .await;
    assert!(
        server
            .metric("edge_tunnel_agents_disconnected_total{reason=\"untrusted\"}")
            .await
            >= 1.0
    );
    // And its reconnects fail the handshake.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(registered_serial(&server, "edge-1").is_none());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_closes_the_connection_and_fails_the_handshake() {
    init_logging();
    let pki = Pki::new();
    let dir = pki.issue_agent("edge-1", &[LOOPBACK.parse().unwrap()]);
    let serial = identity_in(&dir).serial;
    // A CRL of this CA revoking another certificate, to start with.
    let crl = pki.dir.path().join("agents.crl");
    std::fs::write(&crl, pki.ca.crl(&[vec![0x42]], 1, 30).unwrap()).unwrap();
    let mut settings = TestServer::config(&pki, "127.0.0.1:0".parse().unwrap());
    settings.crl = Some(crl.clone());
    settings.reload_interval = Duration::from_secs(1);
    let server = TestServer::start_with(settings).await;
    let agent = TestAgent::start(TestAgent::config(&pki, "edge-1", server.addrs.quic, &[]));
    server
        .wait_for_agent("edge-1", Duration::from_secs(10))
        .await;

    // Revoke it: the live connection goes within a reload interval ...
    let raw: Vec<u8> = (0..serial.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&serial[i..i + 2], 16).unwrap())
        .collect();
    std::fs::write(&crl, pki.ca.crl(&[vec![0x42], raw], 2, 30).unwrap()).unwrap();
    eventually(
        "the revoked agent disconnected",
        Duration::from_secs(10),
        || {
            let gone = registered_serial(&server, "edge-1").is_none();
            async move { gone }
        },
    )
    .await;
    // ... and its reconnects fail the handshake.
    let failures = |page: &str| {
        e2e::metric_in(
            page,
            "edge_tunnel_handshake_failures_total{transport=\"quic\",reason=\"tls\"}",
        ) + e2e::metric_in(
            page,
            "edge_tunnel_handshake_failures_total{transport=\"h2\",reason=\"tls\"}",
        )
    };
    eventually(
        "its reconnects fail the handshake",
        Duration::from_secs(30),
        || {
            let server = &server;
            async move { failures(&server.metrics().await) >= 1.0 }
        },
    )
    .await;
    assert!(registered_serial(&server, "edge-1").is_none());
    assert!(
        server
            .metric("edge_tunnel_agents_disconnected_total{reason=\"revoked\"}")
            .await
            >= 1.0
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_certificate_are_capped_and_timed_out() {
    let (_pki, server, tls) = enrolling_server().await;
    let quic = transport::quic::QuicSettings::default();
    let endpoint = quic
        .client_endpoint("127.0.0.1:0".parse().unwrap())
        .unwrap();
    // Connections that finish the handshake without a certificate and
    // then say nothing: four from one source are held ...
    let per_source = tunnel_server::enroll::Enroller::MAX_UNAUTHENTICATED_PER_SOURCE;
    let mut conns = Vec::new();
    for _ in 0..per_source + 1 {
        let conn = endpoint
            .connect_with(
                quic.client_config(tls.clone()).unwrap(),
                server.addrs.quic,
                "localhost",
            )
            .unwrap()
            .await
            .expect("handshake without a client certificate");
        conns.push(conn);
    }
    // ... the next is closed at once ...
    eventually("the fifth closed", Duration::from_secs(3), || {
        let closed = conns.iter().filter(|c| c.close_reason().is_some()).count();
        async move { closed == 1 }
    })
    .await;
    assert_eq!(
        server
            .metric("edge_tunnel_enrollments_total{result=\"busy\"}")
            .await,
        1.0
    );
    // ... and the silent ones go after the enrollment timeout.
    let bound = tunnel_server::enroll::Enroller::ENROLL_TIMEOUT + Duration::from_secs(5);
    eventually("the silent ones closed", bound, || {
        let open = conns.iter().filter(|c| c.close_reason().is_none()).count();
        async move { open == 0 }
    })
    .await;
}

/// A peer without a certificate that grants the server no flow-control
/// credit cannot keep its enrollment slot: the refusal it never takes is
/// given up after a bound and the connection closed, so the slots of its
/// source are free again (before, each such peer held one for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_takes_no_answer_does_not_keep_its_slot() {
    let (_pki, server, tls) = enrolling_server().await;
    let mut quic = transport::quic::QuicSettings::default();
    let endpoint = quic
        .client_endpoint("127.0.0.1:0".parse().unwrap())
        .unwrap();
    let open = quic.client_config(tls.clone()).unwrap();
    // Not one byte of credit for anything the server sends.
    quic.connection_window = 0;
    quic.stream_window = 0;
    let closed = quic.client_config(tls).unwrap();
    let per_source = tunnel_server::enroll::Enroller::MAX_UNAUTHENTICATED_PER_SOURCE;
    let mut stuck = Vec::new();
    for _ in 0..per_source {
        let conn = endpoint
            .connect_with(closed.clone(), server.addrs.quic, "localhost")
            .unwrap()
            .await
            .expect("handshake without a client certificate");
        // A `Hello` without a certificate: refused, in a message the
        // server cannot send.
        let (mut send, recv) = conn.open_bi().await.unwrap();
        transport::write_message(&mut send, &e2e::hostile::hello("edge-1"))
            .await
            .unwrap();
        stuck.push((conn, send, recv));
    }
    eventually("the stuck peers closed", Duration::from_secs(20), || {
        let open = stuck
            .iter()
            .filter(|(c, _, _)| c.close_reason().is_none())
            .count();
        async move { open == 0 }
    })
    .await;
    // Their slots are back: the next peer of that source is admitted.
    let next = endpoint
        .connect_with(open, server.addrs.quic, "localhost")
        .unwrap()
        .await
        .expect("handshake without a client certificate");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(next.close_reason().is_none(), "{:?}", next.close_reason());
    assert_eq!(
        server
            .metric("edge_tunnel_enrollments_total{result=\"busy\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_agent_certificates_renew() {
    init_logging();
    let pki = Pki::new();
    let enrollment = Enrollment::new(&pki);
    let server = TestServer::start_with(enrollment.server(&pki, Duration::from_secs(86_400))).await;
    // The DNAT helper's certificate chains to the same CA but is no agent.
    let dir = pki.issue_dnat_helper();
    let tls = certs::tls::client_config(&certs::CertDir::load(&dir).unwrap(), proto::ALPN).unwrap();
    let quic = transport::quic::QuicSettings::default();
    let endpoint = quic
        .client_endpoint("127.0.0.1:0".parse().unwrap())
        .unwrap();
    let conn = endpoint
        .connect_with(
            quic.client_config(tls).unwrap(),
            server.addrs.quic,
            "localhost",
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let (_, csr) = certs::issue::CsrRequest::generate("edge-1", &[]).unwrap();
    transport::write_message(&mut send, &proto::Message::Renew(proto::Renew { csr }))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        transport::read_message(&mut recv, &mut buf),
    )
    .await
    .unwrap();
    match answer {
        Ok(proto::Message::Refuse(r)) => {
            assert_eq!(r.code, proto::RefuseCode::EnrollmentRefused);
            assert!(r.reason.contains("agent"), "{}", r.reason);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        server
            .metric("edge_tunnel_renewals_total{result=\"not_an_agent\"}")
            .await
            >= 1.0
    );
}
