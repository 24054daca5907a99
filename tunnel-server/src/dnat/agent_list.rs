//! Where the standalone DNAT helper learns the agents' addresses: a
//! server's agent feed (`--feed-listen`), `GET /v1/agents` over TLS 1.3
//! with hyper's HTTP/1.1 client. Both ends are authenticated: the server's
//! certificate must chain to the CA pinned with `--server-ca` and name the
//! host dialed (or `--server-name`); the helper presents its own client
//! certificate (`tunnel-certs dnat-helper`). Plain `http://` is refused:
//! every address in the feed becomes a DNAT rule on this host.
//! One connection per read, bounded in time and in size.

use std::error::Error as StdError;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::AlertDescription;
use tokio_rustls::TlsConnector;

/// Default bound on one read (connect, TLS, request and body together).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest body accepted: far above the listing of a 10,000-node
/// fleet (about 3 MiB); the body is held in memory while parsed.
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// Why the agent list could not be read. Every variant names the URL or
/// the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum AgentListError {
    #[error("--server-feed {url}: plain http:// is refused: every address in the feed becomes a DNAT rule, so the helper reads it over TLS with both ends authenticated; use https://HOST:PORT (the server's --feed-listen) with --server-ca and --cert-dir")]
    PlainHttp { url: String },
    #[error("--server-feed {url:?}: expected https://HOST:PORT (the server's --feed-listen)")]
    UnsupportedUrl { url: String },
    #[error("{what}: {detail}")]
    Certificates { what: &'static str, detail: String },
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("{url}: the server's certificate is not trusted ({detail}): it must chain to the CA pinned with --server-ca {ca_file} and name {server_name} (the host dialed, or --server-name)")]
    ServerCertificate {
        url: String,
        ca_file: String,
        server_name: String,
        detail: String,
    },
    #[error("{url}: the server refused this helper's client certificate (TLS alert {alert}): --cert-dir must hold a certificate the server's CA issued for the DNAT helper (tunnel-certs dnat-helper)")]
    ClientRejected { url: String, alert: String },
    #[error("{url}: TLS failed: {detail}")]
    Tls { url: String, detail: String },
    #[error("{url}: the server refused this helper's certificate: {message}")]
    Forbidden { url: String, message: String },
    #[error("HTTP exchange with {url} failed: {}", with_causes(source))]
    Http { url: String, source: hyper::Error },
    #[error("{url} answered {status}, not 200 OK")]
    Status { url: String, status: StatusCode },
    #[error("{url}: the agent list is larger than {limit} bytes (--feed-max-body)")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: reading the agent list failed: {detail}")]
    Body { url: String, detail: String },
    #[error("{url}: no complete answer within {timeout:?} (--feed-timeout)")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: bad JSON: {source}")]
    Json {
        url: String,
        source: serde_json::Error,
    },
}

impl AgentListError {
    /// The `result` label of `dnat_feed_reads` for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            AgentListError::PlainHttp { .. }
            | AgentListError::UnsupportedUrl { .. }
            | AgentListError::Certificates { .. } => "config",
            AgentListError::Connect { .. } => "connect",
            AgentListError::ServerCertificate { .. } => "server_certificate",
            AgentListError::ClientRejected { .. } => "client_rejected",
            AgentListError::Tls { .. } => "tls",
            AgentListError::Forbidden { .. } => "forbidden",
            AgentListError::Http { .. } | AgentListError::Body { .. } => "http",
            AgentListError::Status { .. } => "status",
            AgentListError::TooLarge { .. } => "too_large",
            AgentListError::Timeout { .. } => "timeout",
            AgentListError::Json { .. } => "json",
        }
    }
}

/// `e` and its causes, `: `-separated (hyper's own message is often only
/// "operation was canceled"; the cause says why).
fn with_causes(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// The rustls error somewhere in `e`'s chain (tokio-rustls and hyper wrap
/// it in `io::Error`s).
fn rustls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// A feed URL's `host:port` and host (without IPv6 brackets).
pub fn parse_feed_url(url: &str) -> Result<(String, String), AgentListError> {
    if url.starts_with("http://") {
        return Err(AgentListError::PlainHttp {
            url: url.to_owned(),
        });
    }
    let unsupported = || AgentListError::UnsupportedUrl {
        url: url.to_owned(),
    };
    let rest = url.strip_prefix("https://").ok_or_else(unsupported)?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority.rsplit_once(':').ok_or_else(unsupported)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').ok_or_else(unsupported)?,
        None if host.contains(':') => return Err(unsupported()),
        None => host,
    };
    if host.is_empty() || !port_ok {
        return Err(unsupported());
    }
    Ok((authority.to_owned(), host.to_owned()))
}

/// The helper's TLS client: TLS 1.3, the server must chain to `server_ca`
/// (PEM file; default `CERT_DIR/ca.crt`), our certificate from `cert_dir`.
/// Returns the configuration and the CA file's name, for messages.
pub fn client_config(
    cert_dir: &Path,
    server_ca: Option<&Path>,
) -> Result<(Arc<rustls::ClientConfig>, String), AgentListError> {
    let bad = |what, e: &dyn std::fmt::Display| AgentListError::Certificates {
        what,
        detail: e.to_string(),
    };
    let mut dir = certs::CertDir::load(cert_dir).map_err(|e| bad("--cert-dir", &e))?;
    let ca_file = match server_ca {
        Some(path) => {
            dir.ca = certs::files::read_certs(path).map_err(|e| bad("--server-ca", &e))?;
            path.display().to_string()
        }
        None => cert_dir.join(certs::files::CA_CRT).display().to_string(),
    };
    let config =
        certs::tls::client_config(&dir, crate::feed::ALPN).map_err(|e| bad("--server-ca", &e))?;
    Ok((Arc::new(config), ca_file))
}

/// A server's agent feed, as the standalone helper polls it.
#[derive(Clone)]
pub struct AgentList {
    /// `host:port`: what we connect to, and the `Host` header.
    authority: String,
    /// The name the server certificate must carry.
    server_name: ServerName<'static>,
    server_name_text: String,
    connector: TlsConnector,
    /// The pinned CA file, for messages.
    ca_file: String,
    /// The full URL read, for messages.
    url: String,
    /// Bound on connect, TLS, request and the whole body together
    /// (`--feed-timeout`, default 10 s): a slow server delays one poll,
    /// never the helper's shutdown.
    pub timeout: Duration,
    /// Largest body accepted (`--feed-max-body`, default 16 MiB).
    pub max_body: usize,
}

impl AgentList {
    /// From the feed URL (`https://HOST:PORT`; any path is ignored,
    /// `/v1/agents` is always read), the name to verify (default: HOST),
    /// and the TLS client from [`client_config`].
    pub fn try_new(
        server_feed: &str,
        server_name: Option<&str>,
        tls: (Arc<rustls::ClientConfig>, String),
    ) -> Result<AgentList, AgentListError> {
        let (authority, host) = parse_feed_url(server_feed)?;
        let name = server_name.unwrap_or(&host).to_owned();
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| AgentListError::Certificates {
                what: "--server-name",
                detail: format!("{name:?} is not a DNS name or an IP address"),
            })?;
        let (config, ca_file) = tls;
        Ok(AgentList {
            url: format!("https://{authority}/v1/agents"),
            authority,
            server_name,
            server_name_text: name,
            connector: TlsConnector::from(config),
            ca_file,
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
        })
    }

    /// The URL read, e.g. `https://10.0.0.5:9443/v1/agents`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every address of every agent the server lists.
    pub async fn fetch(&self) -> Result<Vec<IpAddr>, AgentListError> {
        let body = tokio::time::timeout(self.timeout, self.get())
            .await
            .map_err(|_| AgentListError::Timeout {
                url: self.url.clone(),
                timeout: self.timeout,
            })??;
        #[derive(serde::Deserialize)]
        struct Agent {
            addresses: Vec<IpAddr>,
        }
        let agents: Vec<Agent> =
            serde_json::from_slice(&body).map_err(|source| AgentListError::Json {
                url: self.url.clone(),
                source,
            })?;
        Ok(agents.into_iter().flat_map(|a| a.addresses).collect())
    }

    /// A TLS failure, classified by what the operator has to fix.
    fn tls_error(&self, e: &(dyn StdError + 'static)) -> Option<AgentListError> {
        let url = self.url.clone();
        Some(match rustls_error(e)? {
            rustls::Error::InvalidCertificate(why) => AgentListError::ServerCertificate {
                url,
                ca_file: self.ca_file.clone(),
                server_name: self.server_name_text.clone(),
                detail: format!("{why:?}"),
            },
            rustls::Error::AlertReceived(
                alert @ (AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateRequired
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError),
            ) => AgentListError::ClientRejected {
                url,
                alert: format!("{alert:?}"),
            },
            other => AgentListError::Tls {
                url,
                detail: other.to_string(),
            },
        })
    }

    /// The body of a 200 answer to `GET /v1/agents`.
    async fn get(&self) -> Result<Bytes, AgentListError> {
        let url = || self.url.clone();
        let http = |source: hyper::Error| {
            self.tls_error(&source)
                .unwrap_or(AgentListError::Http { url: url(), source })
        };
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|source| AgentListError::Connect { url: url(), source })?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                self.tls_error(&e).unwrap_or(AgentListError::Tls {
                    url: url(),
                    detail: e.to_string(),
                })
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(http)?;
        let request = Request::get("/v1/agents")
            .header(hyper::header::HOST, &self.authority)
            .body(Empty::<Bytes>::new())
            .expect("a GET with a path and a Host header is a valid request");
        let exchange = async {
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status();
            let limited = Limited::new(response.into_body(), self.max_body);
            let body = limited.collect().await.map_err(|e| {
                if e.is::<LengthLimitError>() {
                    AgentListError::TooLarge {
                        url: url(),
                        limit: self.max_body,
                    }
                } else {
                    let source: &(dyn StdError + 'static) = &*e;
                    self.tls_error(source).unwrap_or(AgentListError::Body {
                        url: url(),
                        detail: e.to_string(),
                    })
                }
            })?;
            match status {
                StatusCode::OK => Ok(body.to_bytes()),
                StatusCode::FORBIDDEN => Err(AgentListError::Forbidden {
                    url: url(),
                    message: String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
                }),
                status => Err(AgentListError::Status { url: url(), status }),
            }
        };
        // Drive the connection on this task, so nothing outlives the call
        // (or the timeout around it). Its errors reach `exchange` too.
        let conn = async {
            let _ = conn.await;
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = exchange => r,
            () = conn => unreachable!("pending never completes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use certs::issue::Ca;
    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use super::*;

    /// A tunnel CA with a server certificate for 127.0.0.1, the DNAT
    /// helper's certificate and an agent's, in the Secret layout.
    struct Setup {
        dir: tempfile::TempDir,
        ca: Ca,
    }

    impl Setup {
        fn new() -> Setup {
            Setup::with_ca("feed test CA")
        }

        fn with_ca(ca_name: &str) -> Setup {
            let setup = Setup {
                dir: tempfile::tempdir().unwrap(),
                ca: Ca::generate(ca_name, 1).unwrap(),
            };
            let server = setup
                .ca
                .issue_server("tunnel-server", &[], &["127.0.0.1".parse().unwrap()], 1)
                .unwrap();
            setup.write("server", &server);
            let helper = setup.ca.issue_dnat_helper(1).unwrap();
            setup.write("helper", &helper);
            let agent = setup
                .ca
                .issue_agent("edge-1", &["198.18.1.2".parse().unwrap()], 1)
                .unwrap();
            setup.write("agent", &agent);
            setup
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, leaf: &certs::issue::Pem) {
            certs::files::write_leaf_dir(&self.path(name), leaf, &self.ca.pem().cert, true)
                .unwrap();
        }

        fn acceptor(&self) -> TlsAcceptor {
            let dir = certs::CertDir::load(&self.path("server")).unwrap();
            let config = certs::tls::server_config(&dir, crate::feed::ALPN).unwrap();
            TlsAcceptor::from(Arc::new(config))
        }

        /// The helper reading `addr` with the certificates in `cert_dir`.
        fn list_as(&self, addr: SocketAddr, cert_dir: &str) -> AgentList {
            let tls = client_config(&self.path(cert_dir), None).unwrap();
            AgentList::try_new(&format!("https://{addr}"), None, tls).unwrap()
        }

        fn list(&self, addr: SocketAddr) -> AgentList {
            self.list_as(addr, "helper")
        }
    }

    /// A TLS server on 127.0.0.1:0 answering every request with `status`
    /// and `body` (whatever the client certificate).
    async fn serve(acceptor: TlsAcceptor, status: u16, body: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (body, acceptor) = (body.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        assert_eq!(req.uri().path(), "/v1/agents");
                        let resp = Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body.clone())))
                            .unwrap();
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        addr
    }

    /// A TLS server that reads each request's head, answers `bytes` and
    /// then keeps the connection open.
    async fn raw(acceptor: TlsAcceptor, bytes: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls.write_all(bytes).await;
                let _ = tls.flush().await;
                held.push(tls);
            }
        });
        addr
    }

    /// The server's real feed (`--feed-listen`), with no agents.
    async fn feed(setup: &Setup) -> SocketAddr {
        feed_with(setup, None, |_| {}).await
    }

    /// The server's feed, with `deny` as its deny-list and `tune` applied
    /// to its settings.
    async fn feed_with(
        setup: &Setup,
        deny: Option<&std::path::Path>,
        tune: impl FnOnce(&mut crate::ServerSettings),
    ) -> SocketAddr {
        let mut settings =
            crate::ServerSettings::new("127.0.0.1:0".parse().unwrap(), setup.path("server"));
        tune(&mut settings);
        let config = crate::ServerConfig::try_new(settings).unwrap();
        let mut shared = crate::Shared::new(config);
        shared.live_tls =
            Some(crate::live_tls::LiveTls::load(&setup.path("server"), deny, None, false).unwrap());
        let shared = Arc::new(shared);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::feed::serve(listener, setup.acceptor(), shared));
        addr
    }

    #[tokio::test]
    async fn reads_every_address_of_every_agent() {
        let setup = Setup::new();
        let json = r#"[{"node": "edge-1", "addresses": ["198.18.1.2", "fd00::2"]},
                      {"node": "edge-2", "addresses": ["198.18.1.3"]}]"#;
        let addr = serve(setup.acceptor(), 200, json.into()).await;
        let got = setup.list(addr).fetch().await.unwrap();
        let want: Vec<IpAddr> = ["198.18.1.2", "fd00::2", "198.18.1.3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn the_servers_feed_answers_the_helper_certificate() {
        let setup = Setup::new();
        let addr = feed(&setup).await;
        assert!(setup.list(addr).fetch().await.unwrap().is_empty());
    }

    /// A leaked helper certificate put on the deny-list reads the agent
    /// list no more (the handshake checks only the CRL).
    #[tokio::test]
    async fn the_servers_feed_refuses_a_denied_helper_certificate() {
        let setup = Setup::new();
        let leaf = certs::files::read_certs(&setup.path("helper").join("tls.crt")).unwrap();
        let serial = certs::Identity::from_der(&leaf[0]).unwrap().serial;
        let deny = setup.path("deny-list");
        std::fs::write(&deny, format!("serial={serial}\n")).unwrap();
        let addr = feed_with(&setup, Some(&deny), |_| {}).await;
        let e = setup.list(addr).fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Forbidden { .. }), "{e}");
        assert!(e.to_string().contains("revoked"), "{e}");
    }

    /// Idle connections from one source take its share of the feed, not
    /// every slot: past the share that source is closed at once, and once
    /// it lets go it reads again.
    #[tokio::test]
    async fn one_source_cannot_take_every_feed_slot() {
        let setup = Setup::new();
        let addr = feed_with(&setup, None, |s| s.feed_max_connections_per_source = 2).await;
        let idle = [
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        ];
        let e = setup.list(addr).fetch().await.unwrap_err();
        assert!(!matches!(e, AgentListError::Forbidden { .. }), "{e}");
        drop(idle);
        // The server notices the closes as it reads them; a few tries.
        let mut read = Err(e);
        for _ in 0..50 {
            read = setup.list(addr).fetch().await;
            if read.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(read.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_servers_feed_refuses_an_agent_certificate() {
        // Same CA, so TLS succeeds; the identity is not the helper's.
        let setup = Setup::new();
        let addr = feed(&setup).await;
        let e = setup.list_as(addr, "agent").fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Forbidden { .. }), "{e}");
        assert_eq!(e.reason(), "forbidden");
        let msg = e.to_string();
        assert!(msg.contains("\"edge-1\""), "{msg}");
        assert!(msg.contains("tunnel-certs dnat-helper"), "{msg}");
    }

    #[tokio::test]
    async fn a_server_certificate_from_another_ca_is_refused() {
        let setup = Setup::new();
        // Another CA's server, with a certificate for the right address:
        // a CA of another name (unknown issuer) and one of the same name
        // (`tunnel-certs ca` gives every CA the same default name; the
        // signature does not verify).
        for (other, why) in [
            (Setup::with_ca("another CA"), "UnknownIssuer"),
            (Setup::new(), "BadSignature"),
        ] {
            let addr = serve(other.acceptor(), 200, b"[]".to_vec()).await;
            let e = setup.list(addr).fetch().await.unwrap_err();
            assert!(matches!(e, AgentListError::ServerCertificate { .. }), "{e}");
            assert_eq!(e.reason(), "server_certificate");
            let msg = e.to_string();
            assert!(msg.contains("--server-ca"), "{msg}");
            assert!(msg.contains("ca.crt"), "{msg}");
            assert!(msg.contains(why), "{msg}");
        }
    }

    #[tokio::test]
    async fn a_pinned_ca_file_replaces_the_cert_dirs() {
        let setup = Setup::new();
        let other = Setup::with_ca("another CA");
        let addr = serve(setup.acceptor(), 200, b"[]".to_vec()).await;
        // The helper's directory trusts another CA...
        let pinned = setup.dir.path().join("pinned-ca.crt");
        std::fs::copy(setup.path("helper").join("ca.crt"), &pinned).unwrap();
        std::fs::copy(
            other.path("helper").join("ca.crt"),
            setup.path("helper").join("ca.crt"),
        )
        .unwrap();
        let e = setup.list(addr).fetch().await.unwrap_err();
        assert_eq!(e.reason(), "server_certificate", "{e}");
        // ...and --server-ca pins the server's.
        let tls = client_config(&setup.path("helper"), Some(&pinned)).unwrap();
        assert_eq!(tls.1, pinned.display().to_string());
        let list = AgentList::try_new(&format!("https://{addr}"), None, tls).unwrap();
        assert!(list.fetch().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_server_certificate_must_name_the_server() {
        let setup = Setup::new();
        let addr = serve(setup.acceptor(), 200, b"[]".to_vec()).await;
        let tls = client_config(&setup.path("helper"), None).unwrap();
        let list =
            AgentList::try_new(&format!("https://{addr}"), Some("feed.example.com"), tls).unwrap();
        let e = list.fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::ServerCertificate { .. }), "{e}");
        assert!(e.to_string().contains("feed.example.com"), "{e}");
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_is_rejected_by_the_server() {
        let setup = Setup::new();
        let other = Setup::new();
        let addr = feed(&setup).await;
        // Trusts our server (pinned CA) but presents the other CA's helper
        // certificate.
        let pinned = setup.path("server").join("ca.crt");
        let tls = client_config(&other.path("helper"), Some(&pinned)).unwrap();
        let list = AgentList::try_new(&format!("https://{addr}"), None, tls).unwrap();
        let e = list.fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::ClientRejected { .. }), "{e}");
        assert!(e.to_string().contains("--cert-dir"), "{e}");
    }

    #[test]
    fn plain_http_is_refused_naming_the_flag() {
        let e = parse_feed_url("http://10.0.0.5:9090").unwrap_err();
        assert!(matches!(e, AgentListError::PlainHttp { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("--server-feed"), "{msg}");
        assert!(msg.contains("https://"), "{msg}");
    }

    #[test]
    fn feed_urls_parse() {
        assert_eq!(
            parse_feed_url("https://10.0.0.5:9443/some/path").unwrap(),
            ("10.0.0.5:9443".to_owned(), "10.0.0.5".to_owned())
        );
        assert_eq!(
            parse_feed_url("https://[fd00::5]:9443").unwrap(),
            ("[fd00::5]:9443".to_owned(), "fd00::5".to_owned())
        );
        assert_eq!(
            parse_feed_url("https://tunnel.example.com:9443").unwrap().1,
            "tunnel.example.com"
        );
        for bad in [
            "https://10.0.0.5",
            "https://10.0.0.5:0",
            "https://:9443",
            "https://fd00::5:9443",
            "ftp://10.0.0.5:21",
            "10.0.0.5:9443",
        ] {
            let e = parse_feed_url(bad).unwrap_err();
            assert!(
                matches!(e, AgentListError::UnsupportedUrl { .. }),
                "{bad}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn a_path_in_the_feed_url_is_ignored() {
        let setup = Setup::new();
        let addr = serve(setup.acceptor(), 200, b"[]".to_vec()).await;
        let tls = client_config(&setup.path("helper"), None).unwrap();
        let list =
            AgentList::try_new(&format!("https://{addr}/somewhere/else"), None, tls).unwrap();
        assert_eq!(list.url(), format!("https://{addr}/v1/agents"));
        assert!(list.fetch().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_non_200_answer_names_the_url_and_status() {
        let setup = Setup::new();
        let addr = serve(setup.acceptor(), 500, b"boom".to_vec()).await;
        let e = setup.list(addr).fetch().await.unwrap_err();
        assert!(
            matches!(e, AgentListError::Status { status, .. } if status == 500),
            "{e}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&format!("https://{addr}/v1/agents")), "{msg}");
        assert!(msg.contains("500"), "{msg}");
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused() {
        let setup = Setup::new();
        let addr = serve(setup.acceptor(), 200, vec![b' '; 4096]).await;
        let mut list = setup.list(addr);
        list.max_body = 1024;
        let e = list.fetch().await.unwrap_err();
        assert!(
            matches!(e, AgentListError::TooLarge { limit: 1024, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("--feed-max-body"), "{e}");
    }

    #[tokio::test]
    async fn bad_json_is_an_error() {
        let setup = Setup::new();
        let addr = serve(setup.acceptor(), 200, b"{\"not\": \"a list\"}".to_vec()).await;
        let e = setup.list(addr).fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Json { .. }), "{e}");
    }

    #[tokio::test]
    async fn garbage_instead_of_http_is_an_error() {
        let setup = Setup::new();
        let addr = raw(setup.acceptor(), b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
        let e = setup.list(addr).fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Http { .. }), "{e}");
    }

    #[tokio::test]
    async fn plain_tcp_instead_of_tls_is_an_error() {
        let setup = Setup::new();
        // A plain-HTTP server where the feed should be.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ = tcp.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let e = setup.list(addr).fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Tls { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_url() {
        let setup = Setup::new();
        // Bind, learn the port, close: nothing listens there any more.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let e = setup.list(addr).fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        // Completes TLS, sends half a response head, then nothing: only
        // the timeout ends the read.
        let setup = Setup::new();
        let addr = raw(setup.acceptor(), b"HTTP/1.1 200 OK\r\nContent-Le").await;
        let mut list = setup.list(addr);
        list.timeout = Duration::from_millis(500);
        let e = list.fetch().await.unwrap_err();
        assert!(
            matches!(e, AgentListError::Timeout { timeout, .. } if timeout == Duration::from_millis(500)),
            "{e}"
        );
        assert!(e.to_string().contains("--feed-timeout"), "{e}");
    }

    #[tokio::test]
    async fn a_body_that_stalls_times_out() {
        // The head promises 100 bytes; 2 arrive.
        let setup = Setup::new();
        let addr = raw(
            setup.acceptor(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[]",
        )
        .await;
        let mut list = setup.list(addr);
        list.timeout = Duration::from_millis(500);
        let e = list.fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Timeout { .. }), "{e}");
    }

    #[test]
    fn missing_certificates_name_the_flag() {
        let setup = Setup::new();
        let e = client_config(&setup.path("nowhere"), None).unwrap_err();
        assert!(e.to_string().starts_with("--cert-dir: "), "{e}");
        let e = client_config(&setup.path("helper"), Some(&setup.path("nowhere.crt"))).unwrap_err();
        assert!(e.to_string().starts_with("--server-ca: "), "{e}");
    }
}
