//! Where the standalone DNAT helper learns the agents' addresses: a
//! server's `/v1/agents`, read over plain HTTP/1.1 with hyper's client.
//! One connection per read, bounded in time and in size.

use std::net::IpAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Why the agent list could not be read. Every variant names the URL.
#[derive(Debug, thiserror::Error)]
pub enum AgentListError {
    #[error("--server-admin {url:?}: only http:// URLs are supported")]
    UnsupportedUrl { url: String },
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("HTTP exchange with {url} failed: {}", with_causes(source))]
    Http { url: String, source: hyper::Error },
    #[error("{url} answered {status}, not 200 OK")]
    Status { url: String, status: StatusCode },
    #[error("{url}: the agent list is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: reading the agent list failed: {detail}")]
    Body { url: String, detail: String },
    #[error("{url}: no complete answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: bad JSON: {source}")]
    Json {
        url: String,
        source: serde_json::Error,
    },
}

/// `e` and its causes, `: `-separated (hyper's own message is often only
/// "operation was canceled"; the cause says why).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// A server's agent listing, as the standalone helper polls it.
#[derive(Clone, Debug)]
pub struct AgentList {
    /// `host:port`: what we connect to, and the `Host` header.
    authority: String,
    /// The full URL read, for messages.
    url: String,
    /// Bound on connect, request and the whole body together. Default 10 s:
    /// a slow server delays one poll, never the helper's shutdown.
    pub timeout: Duration,
    /// Largest body accepted. Default 64 MiB, far above the listing of a
    /// 10,000-node fleet; the body is held in memory while parsed.
    pub max_body: usize,
}

impl AgentList {
    /// From the server's admin URL (`http://HOST:PORT`; any path is
    /// ignored, `/v1/agents` is always read).
    pub fn try_new(server_admin: &str) -> Result<AgentList, AgentListError> {
        let rest =
            server_admin
                .strip_prefix("http://")
                .ok_or_else(|| AgentListError::UnsupportedUrl {
                    url: server_admin.to_owned(),
                })?;
        let authority = rest.split('/').next().unwrap_or(rest).to_owned();
        Ok(AgentList {
            url: format!("http://{authority}/v1/agents"),
            authority,
            timeout: Duration::from_secs(10),
            max_body: 64 << 20,
        })
    }

    /// The URL read, e.g. `http://10.0.0.5:9090/v1/agents`.
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

    /// The body of a 200 answer to `GET /v1/agents`.
    async fn get(&self) -> Result<Bytes, AgentListError> {
        let url = || self.url.clone();
        let http = |source| AgentListError::Http { url: url(), source };
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|source| AgentListError::Connect { url: url(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(http)?;
        let request = Request::get("/v1/agents")
            .header(hyper::header::HOST, &self.authority)
            .body(Empty::<Bytes>::new())
            .expect("a GET with a path and a Host header is a valid request");
        let exchange = async {
            let response = sender.send_request(request).await.map_err(http)?;
            if response.status() != StatusCode::OK {
                return Err(AgentListError::Status {
                    url: url(),
                    status: response.status(),
                });
            }
            let body = Limited::new(response.into_body(), self.max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        AgentListError::TooLarge {
                            url: url(),
                            limit: self.max_body,
                        }
                    } else {
                        AgentListError::Body {
                            url: url(),
                            detail: e.to_string(),
                        }
                    }
                })?;
            Ok(body.to_bytes())
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

    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-route hyper server on 127.0.0.1:0 answering every request
    /// with `status` and `body`.
    async fn serve(status: u16, body: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        assert_eq!(req.uri().path(), "/v1/agents");
                        let resp = Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body.clone())))
                            .unwrap();
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    }

    /// A raw TCP server that reads each request's head, answers `bytes`
    /// and then keeps the connection open. (Bytes sent before the request
    /// would make hyper drop the connection before it sends anything.)
    async fn raw(bytes: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp.write_all(bytes).await;
                held.push(tcp);
            }
        });
        addr
    }

    fn list(addr: SocketAddr) -> AgentList {
        AgentList::try_new(&format!("http://{addr}")).unwrap()
    }

    #[tokio::test]
    async fn reads_every_address_of_every_agent() {
        let json = r#"[{"node": "edge-1", "addresses": ["198.18.1.2", "fd00::2"]},
                      {"node": "edge-2", "addresses": ["198.18.1.3"]}]"#;
        let addr = serve(200, json.into()).await;
        let got = list(addr).fetch().await.unwrap();
        let want: Vec<IpAddr> = ["198.18.1.2", "fd00::2", "198.18.1.3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_path_in_the_admin_url_is_ignored() {
        let addr = serve(200, b"[]".to_vec()).await;
        let list = AgentList::try_new(&format!("http://{addr}/somewhere/else")).unwrap();
        assert_eq!(list.url(), format!("http://{addr}/v1/agents"));
        assert!(list.fetch().await.unwrap().is_empty());
    }

    #[test]
    fn only_http_urls_are_accepted() {
        let e = AgentList::try_new("https://10.0.0.5:9090").unwrap_err();
        assert!(matches!(e, AgentListError::UnsupportedUrl { .. }), "{e}");
        assert!(e.to_string().contains("https://10.0.0.5:9090"), "{e}");
    }

    #[tokio::test]
    async fn a_non_200_answer_names_the_url_and_status() {
        let addr = serve(500, b"boom".to_vec()).await;
        let e = list(addr).fetch().await.unwrap_err();
        assert!(
            matches!(e, AgentListError::Status { status, .. } if status == 500),
            "{e}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&format!("http://{addr}/v1/agents")), "{msg}");
        assert!(msg.contains("500"), "{msg}");
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused() {
        let addr = serve(200, vec![b' '; 4096]).await;
        let mut list = list(addr);
        list.max_body = 1024;
        let e = list.fetch().await.unwrap_err();
        assert!(
            matches!(e, AgentListError::TooLarge { limit: 1024, .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn bad_json_is_an_error() {
        let addr = serve(200, b"{\"not\": \"a list\"}".to_vec()).await;
        let e = list(addr).fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Json { .. }), "{e}");
    }

    #[tokio::test]
    async fn garbage_instead_of_http_is_an_error() {
        let addr = raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
        let e = list(addr).fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Http { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_url() {
        // Bind, learn the port, close: nothing listens there any more.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let e = list(addr).fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_times_out() {
        // Accepts, sends half a response head, then nothing: only the
        // timeout (10 s by default, on the paused clock) ends the read.
        let addr = raw(b"HTTP/1.1 200 OK\r\nContent-Le").await;
        let e = list(addr).fetch().await.unwrap_err();
        assert!(
            matches!(e, AgentListError::Timeout { timeout, .. } if timeout == Duration::from_secs(10)),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_times_out() {
        // The head promises 100 bytes; 2 arrive.
        let addr = raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[]").await;
        let e = list(addr).fetch().await.unwrap_err();
        assert!(matches!(e, AgentListError::Timeout { .. }), "{e}");
    }
}
