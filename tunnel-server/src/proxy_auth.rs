//! Who may use the CONNECT ingress: every request is authorized before it
//! is routed, so an unauthenticated client learns nothing (not even which
//! nodes exist).
//!
//! - A Unix-socket client (`--connect-uds`) was admitted by the socket's
//!   permissions (counted by its uid).
//! - A client of `--connect-tls-listen` is authenticated by its
//!   certificate, which the handshake verified against that CA. A
//!   certificate that also chains to the tunnel's own CA is accepted only
//!   as a CONNECT client (CN `edge-tunnel:connect:NAME`) or the DNAT
//!   helper; an agent's certificate gets 403 (a compromised edge node must
//!   not reach the others through the ingress).
//! - A TCP client (or a TLS client without a certificate, which the
//!   handshake lets through only when a token file is given) needs a token (`Proxy-Authorization`, see
//!   [`crate::tokens`]) when `--connect-token-file` is given; a missing or
//!   wrong one gets `407` with `Proxy-Authenticate: Basic`, so curl and Go
//!   clients retry with their credentials.
//! - Without a token file a TCP listener is open: the configuration allows
//!   that only on loopback or with `--connect-allow-unauthenticated`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION};
use hyper::{Response, StatusCode};

use crate::connect::Peer;
use crate::tokens::TokenFile;
use crate::Shared;

/// What a TLS client's certificate makes of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertIdentity {
    /// Accepted by its issuer: its common name (for the log, the metrics
    /// and the deny-list) and serial (for the deny-list and the CRL, which
    /// every request checks).
    Accepted { name: Arc<str>, serial: Arc<str> },
    /// Chains to `--connect-client-ca` but may not use the ingress: why.
    Refused(Arc<str>),
}

/// The TLS CONNECT listener's side (`--connect-tls-listen`, `--connect-client-ca`).
#[derive(Clone)]
pub struct ConnectTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Verifies against the tunnel's own CA, to tell agent certificates
    /// apart.
    pub tunnel: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl ConnectTls {
    /// The TLS configuration of the CONNECT listener: the server's own
    /// certificate, client certificates verified against `client_ca`
    /// (required, or optional when a token file authenticates the clients
    /// without one).
    pub fn new(
        dir: &certs::CertDir,
        resolver: Arc<dyn rustls::server::ResolvesServerCert>,
        client_ca: &std::path::Path,
        optional: bool,
    ) -> Result<ConnectTls, crate::ServerError> {
        let bad = |problem: String| crate::ServerError::ConnectClientCa {
            path: client_ca.to_owned(),
            problem,
        };
        let cas = certs::files::read_certs(client_ca).map_err(|e| bad(e.to_string()))?;
        if cas.is_empty() {
            return Err(bad("it holds no PEM certificate".into()));
        }
        let roots = certs::tls::roots_of(&cas).map_err(|e| bad(e.to_string()))?;
        let mode = if optional {
            certs::tls::ClientCertificate::Optional
        } else {
            certs::tls::ClientCertificate::Required
        };
        let config = certs::tls::server_config_with_resolver(resolver, roots, b"http/1.1", mode)?;
        let tunnel = certs::tls::client_verifier(certs::tls::roots_of(&dir.ca)?)?;
        Ok(ConnectTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            tunnel,
        })
    }

    /// Who the client of a finished handshake is: `None` when it sent no
    /// certificate.
    pub fn identify(&self, conn: &rustls::ServerConnection) -> Option<CertIdentity> {
        let chain = conn.peer_certificates()?;
        let (leaf, intermediates) = chain.split_first()?;
        Some(identify(leaf, intermediates, self.tunnel.as_ref()))
    }
}

/// See [`ConnectTls::identify`]: `leaf` already chains to the client CA.
fn identify(
    leaf: &rustls::pki_types::CertificateDer<'_>,
    intermediates: &[rustls::pki_types::CertificateDer<'_>],
    tunnel: &dyn rustls::server::danger::ClientCertVerifier,
) -> CertIdentity {
    let (name, serial) = certs::Identity::from_der(leaf)
        .map(|id| (id.common_name, id.serial))
        .unwrap_or_else(|_| ("(no common name)".to_owned(), String::new()));
    let from_tunnel_ca = tunnel
        .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
        .is_ok();
    let tunnel_client = name.starts_with(certs::identity::CONNECT_CLIENT_PREFIX)
        || name == certs::identity::DNAT_HELPER_CN;
    if from_tunnel_ca && !tunnel_client {
        CertIdentity::Refused(
            format!(
                "certificate {name:?} is the tunnel's (an agent's?), not a CONNECT client's: \
                 issue one with `tunnel-certs connect-client`"
            )
            .into(),
        )
    } else {
        CertIdentity::Accepted {
            name: name.into(),
            serial: serial.into(),
        }
    }
}

/// The realm named in `Proxy-Authenticate`.
pub const REALM: &str = "edge-tunnel";

/// How the CONNECT ingress authorizes requests.
#[derive(Debug, Default)]
pub struct ProxyAuth {
    /// `--connect-token-file`, when given.
    pub tokens: Option<Arc<TokenFile>>,
}

/// What admitted a request: a tunnel it opened lives only as long as this
/// still would admit it ([`Credential::revoked`], checked again whenever
/// the credentials change).
#[derive(Clone, Debug)]
pub enum Credential {
    /// Nothing that can be revoked here: a Unix-socket client, or a
    /// listener open without credentials.
    Standing,
    /// A client certificate: revoked by the deny-list or the CRL.
    Certificate { name: Arc<str>, serial: Arc<str> },
    /// A token: revoked by its removal from `--connect-token-file`.
    Token {
        name: Arc<str>,
        presented: HeaderValue,
    },
}

impl Credential {
    /// Why it no longer admits anything, if it does not.
    pub fn revoked(&self, shared: &Shared) -> Option<String> {
        match self {
            Credential::Standing => None,
            Credential::Certificate { name, serial } => shared
                .live_tls
                .as_ref()
                .and_then(|t| t.denies_node(name, serial, None))
                .map(|why| format!("certificate {name:?} is revoked: {why}")),
            Credential::Token { name, presented } => {
                let tokens = shared.proxy_auth.tokens.as_ref()?.tokens();
                let still = presented.to_str().ok().and_then(|v| tokens.check(v));
                match still {
                    Some(_) => None,
                    None => Some(format!(
                        "token {name:?} is no longer in --connect-token-file"
                    )),
                }
            }
        }
    }

    /// Watches the credential in a task of its own while the returned
    /// [`Revocation`] lives (`None` for [`Credential::Standing`]): once it
    /// is revoked, the revocation is counted and its signal stopped. The
    /// relay only polls the signal's atomic flag.
    pub fn watch(self, shared: &Arc<Shared>) -> Option<Revocation> {
        if matches!(self, Credential::Standing) {
            return None;
        }
        let signal = Arc::new(transport::StopSignal::default());
        let reason = Arc::new(std::sync::OnceLock::new());
        let task = tokio::spawn({
            let (shared, signal, reason) = (shared.clone(), signal.clone(), reason.clone());
            async move {
                let why = self.until_revoked(shared.clone()).await;
                shared.metrics.revoked_tunnel_resets.inc();
                let _ = reason.set(why);
                signal.stop();
            }
        });
        Some(Revocation {
            signal,
            reason,
            task,
        })
    }

    /// Completes, with the reason, once the credential is revoked: checked
    /// now and after every change of the credentials in force (never
    /// otherwise, so a tunnel costs nothing while they stay as they are).
    pub async fn until_revoked(self, shared: Arc<Shared>) -> String {
        if matches!(self, Credential::Standing) {
            return std::future::pending().await;
        }
        // Subscribed before the first check: a change between the check
        // and the wait is not missed.
        let mut changes = shared.credentials.subscribe();
        loop {
            if let Some(why) = self.revoked(&shared) {
                return why;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// A credential watched for revocation ([`Credential::watch`]); the watch
/// ends when this is dropped.
pub struct Revocation {
    /// Stopped once the credential is revoked.
    pub signal: Arc<transport::StopSignal>,
    reason: Arc<std::sync::OnceLock<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Revocation {
    /// Completes once the credential is revoked.
    pub async fn revoked(&self) {
        self.signal.stopped().await;
    }

    /// Why it was revoked (once it was).
    pub fn reason(&self) -> &str {
        self.reason.get().map_or("revoked", String::as_str)
    }
}

impl Drop for Revocation {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Completes once `revocation` does; never without one.
pub async fn revoked(revocation: Option<&Revocation>) {
    match revocation {
        Some(r) => r.revoked().await,
        None => std::future::pending().await,
    }
}

/// Authorizes one request: what admitted it, or the answer to send
/// instead.
pub fn authorize(
    shared: &Shared,
    peer: &Peer,
    headers: &HeaderMap,
) -> Result<Credential, Box<Response<Full<Bytes>>>> {
    let metrics = &shared.metrics;
    let tokens = match (peer, &shared.proxy_auth.tokens) {
        (Peer::Unix { uid }, _) => {
            let uid = uid.map_or_else(|| "?".to_owned(), |u| u.to_string());
            metrics.connect_authorized("unix", &format!("uid {uid}"));
            return Ok(Credential::Standing);
        }
        (Peer::Certified { identity, .. }, _) => match identity {
            CertIdentity::Accepted { name, serial } => {
                // Checked per request, not once per TLS session: a
                // revocation (`--deny-list`, `--crl`) stops the next
                // request of a kept-alive connection too.
                let credential = Credential::Certificate {
                    name: name.clone(),
                    serial: serial.clone(),
                };
                if let Some(why) = credential.revoked(shared) {
                    metrics.connect_auth_failed("revoked");
                    tracing::warn!(client = %name, %serial, "CONNECT refused: {why}");
                    return Err(Box::new(crate::connect::text(StatusCode::FORBIDDEN, why)));
                }
                metrics.connect_authorized("certificate", name);
                return Ok(credential);
            }
            CertIdentity::Refused(why) => {
                metrics.connect_auth_failed("certificate");
                return Err(Box::new(crate::connect::text(
                    StatusCode::FORBIDDEN,
                    why.to_string(),
                )));
            }
        },
        (Peer::Tcp(_), None) => {
            metrics.connect_authorized("none", "");
            return Ok(Credential::Standing);
        }
        (Peer::Tcp(_), Some(tokens)) => tokens.tokens(),
    };
    let presented = headers.get(PROXY_AUTHORIZATION);
    let refusal = match presented.map(|v| (v, v.to_str())) {
        None => "missing",
        Some((_, Err(_))) => "invalid",
        Some((header, Ok(value))) => match tokens.check(value) {
            Some(name) => {
                metrics.connect_authorized("token", name);
                return Ok(Credential::Token {
                    name: name.into(),
                    presented: header.clone(),
                });
            }
            None => "invalid",
        },
    };
    metrics.connect_auth_failed(refusal);
    if let Peer::Tcp(addr) = peer {
        tracing::debug!(client = %addr, reason = refusal, "CONNECT request without valid proxy credentials");
    }
    Err(Box::new(proxy_auth_required(refusal)))
}

fn proxy_auth_required(reason: &str) -> Response<Full<Bytes>> {
    let body = match reason {
        "missing" => "proxy credentials required: send Proxy-Authorization (Basic name:token, or Bearer token)\n",
        _ => "proxy credentials not accepted\n",
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = StatusCode::PROXY_AUTHENTICATION_REQUIRED;
    let headers = resp.headers_mut();
    headers.insert(
        PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"edge-tunnel\""),
    );
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
