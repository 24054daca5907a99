//! Enrollment with a bootstrap token, and renewal.
//!
//! An agent started with `--bootstrap-token` (or `--bootstrap-token-file`)
//! and no usable certificate in `--cert-dir` enrolls before anything else:
//! it generates its key (which never leaves the node), connects to a
//! server without a client certificate, authenticates the server by the
//! CA (`--ca-cert-hash sha256:…`, a pin of the CA's public key the server
//! must present in its chain, or a `ca.crt` already in `--cert-dir`),
//! sends the token with a CSR for `--node-name` and `--node-ip`, and
//! writes what it is issued: `tls.key` (0600), `tls.crt` and `ca.crt`.
//!
//! While running ([`renew_loop`]), it renews at two thirds of the
//! certificate's lifetime over a connection the current certificate
//! authenticates, and writes the new key and certificate the same way:
//! new connections use them, open ones carry on. A certificate that
//! expired cannot renew; the agent then enrolls again if it has a token
//! (a new one: the old is usually used up).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use certs::files::{CA_CRT, TLS_CRT, TLS_KEY};
use certs::issue::CsrRequest;
use certs::tls::EnrollTrust;
use certs::{CertDir, Identity};
use proto::Message;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::{AgentConfig, TransportChoice, CERT_FILES};
use crate::error::ConnectError;
use crate::register::request_once;
use crate::resolve::resolve_all;
use crate::selector::{FailureKind, Transport};

/// Where the bootstrap token comes from.
#[derive(Clone)]
pub enum TokenSource {
    Value(String),
    /// Read at every attempt, so a Secret updated with a new token is used.
    File(std::path::PathBuf),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Value(_) => f.write_str("TokenSource::Value(<redacted>)"),
            TokenSource::File(p) => write!(f, "TokenSource::File({})", p.display()),
        }
    }
}

impl TokenSource {
    fn read(&self) -> Result<String, String> {
        match self {
            TokenSource::Value(v) => Ok(v.trim().to_owned()),
            TokenSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("cannot read --bootstrap-token-file {}: {e}", path.display())
                })?;
                if text.len() > 256 {
                    return Err(format!(
                        "{} is too long for a bootstrap token",
                        path.display()
                    ));
                }
                Ok(text.trim().to_owned())
            }
        }
    }
}

/// How this agent enrolls.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    pub token: TokenSource,
    /// `--ca-cert-hash`; without it, `ca.crt` in `--cert-dir`.
    pub ca_cert_hash: Option<String>,
    /// `--node-ip`: the addresses to ask for.
    pub addresses: Vec<IpAddr>,
}

/// Why an enrollment or renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Local(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("the server's answer is unusable: {0}")]
    BadAnswer(String),
}

/// Why the certificate in `--cert-dir` cannot be used (so the agent must
/// enroll), or `None` if it can.
pub fn needs_enrollment(config: &AgentConfig) -> Option<String> {
    let dir = {
        let _files = CERT_FILES.read().unwrap_or_else(|e| e.into_inner());
        match CertDir::load(&config.cert_dir) {
            Ok(dir) => dir,
            Err(e) => return Some(e.to_string()),
        }
    };
    let identity = match Identity::from_der(dir.leaf()) {
        Ok(id) => id,
        Err(e) => return Some(format!("tls.crt: {e}")),
    };
    if identity.common_name != config.node {
        return Some(format!(
            "tls.crt is for {:?}, not --node-name {:?}",
            identity.common_name, config.node
        ));
    }
    if identity.remaining(unix_now()) <= 0 {
        return Some("tls.crt has expired".into());
    }
    None
}

/// Enrolls until it succeeds or `stop` turns true (then `false`).
pub async fn enroll_until_done(
    config: &AgentConfig,
    bootstrap: &Bootstrap,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let mut backoff = Backoff::with(
        Duration::from_secs(1),
        Duration::from_secs(300),
        Duration::from_secs(3600),
    );
    loop {
        match enroll(config, bootstrap).await {
            Ok(identity) => {
                tracing::info!(
                    node = %identity.common_name,
                    addresses = ?identity.addresses,
                    not_after = identity.not_after,
                    "enrolled: certificate written to {}",
                    config.cert_dir.display()
                );
                return true;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(retry_in = ?delay, "enrollment failed: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return false,
                }
            }
        }
    }
}

/// One enrollment: the first server that answers.
pub async fn enroll(config: &AgentConfig, bootstrap: &Bootstrap) -> Result<Identity, EnrollError> {
    let token = bootstrap.token.read().map_err(EnrollError::Local)?;
    let trust = match &bootstrap.ca_cert_hash {
        Some(pin) => EnrollTrust::Pin(pin.clone()),
        None => {
            let path = config.cert_dir.join(CA_CRT);
            let cas = certs::files::read_certs(&path).map_err(|e| {
                EnrollError::Local(format!(
                    "no --ca-cert-hash, and no usable ca.crt to trust the server by: {e}"
                ))
            })?;
            EnrollTrust::Roots(cas)
        }
    };
    let (key, csr) = CsrRequest::generate(&config.node, &bootstrap.addresses)
        .map_err(|e| EnrollError::Local(e.to_string()))?;
    let request = Message::Enroll(proto::Enroll {
        version_major: proto::VERSION_MAJOR,
        version_minor: proto::VERSION_MINOR,
        token,
        csr,
    });
    let tls = |alpn: &[u8]| certs::tls::enroll_client_config(&trust, alpn);
    let issued = ask(config, &request, &tls).await?;
    let pin = bootstrap.ca_cert_hash.as_deref();
    store(config, &key, &issued, &bootstrap.addresses, pin)
}

/// Asks every server address in turn (QUIC, then HTTP/2 in `auto`) until
/// one answers `Issued` or refuses.
async fn ask(
    config: &AgentConfig,
    request: &Message,
    tls: &(dyn Fn(&[u8]) -> Result<rustls::ClientConfig, certs::tls::TlsConfigError> + Sync),
) -> Result<proto::Issued, EnrollError> {
    let (targets, errors) = resolve_all(config).await;
    let mut last = errors
        .into_iter()
        .next()
        .map(|e| EnrollError::Local(e.to_string()))
        .unwrap_or_else(|| EnrollError::Local("no --server address resolved".into()));
    let transports: &[Transport] = match config.transport {
        TransportChoice::Auto => &[Transport::Quic, Transport::H2],
        TransportChoice::Quic => &[Transport::Quic],
        TransportChoice::H2 => &[Transport::H2],
    };
    for target in &targets {
        for &transport in transports {
            let tls = |alpn: &[u8]| {
                tls(alpn).map_err(|e| {
                    ConnectError::new(transport, target.addr, FailureKind::Local, e.to_string())
                })
            };
            let bound = match (config.transport, transport) {
                (TransportChoice::Auto, Transport::Quic) => config.quic_timeout,
                _ => config.connect_timeout,
            };
            let answer =
                tokio::time::timeout(bound, request_once(config, target, transport, tls, request))
                    .await
                    .unwrap_or_else(|_| Err(ConnectError::timeout(transport, target.addr, bound)));
            match answer {
                Ok(Message::Issued(issued)) => return Ok(issued),
                Ok(Message::Refuse(r)) => return Err(EnrollError::Refused(r.reason)),
                Ok(other) => {
                    last = EnrollError::BadAnswer(format!("expected Issued, got {}", other.kind()))
                }
                Err(e) => last = e.into(),
            }
        }
    }
    Err(last)
}

/// Checks what the server issued against what was asked and writes it:
/// the key first, then the certificate, then the CA bundle, each replaced
/// atomically, all under the lock connection attempts read them under.
fn store(
    config: &AgentConfig,
    key_pem: &str,
    issued: &proto::Issued,
    addresses: &[IpAddr],
    pin: Option<&str>,
) -> Result<Identity, EnrollError> {
    let bad = |what: String| EnrollError::BadAnswer(what);
    let chain = certs::files::parse_certs(issued.certificate.as_bytes(), Path::new("certificate"))
        .map_err(|e| bad(e.to_string()))?;
    let cas = certs::files::parse_certs(issued.ca.as_bytes(), Path::new("ca bundle"))
        .map_err(|e| bad(e.to_string()))?;
    let identity = Identity::from_der(&chain[0]).map_err(|e| bad(e.to_string()))?;
    if identity.common_name != config.node {
        return Err(bad(format!(
            "the certificate is for {:?}, not {:?}",
            identity.common_name, config.node
        )));
    }
    let mut asked = addresses.to_vec();
    asked.sort();
    let mut got = identity.addresses.clone();
    got.sort();
    if asked != got {
        return Err(bad(format!(
            "the certificate carries {got:?}, not the addresses asked for ({asked:?})"
        )));
    }
    let key = certs::files::parse_key(key_pem.as_bytes(), Path::new("generated key"))
        .map_err(|e| EnrollError::Local(e.to_string()))?;
    rustls::sign::CertifiedKey::from_der(chain.clone(), key, &certs::tls::provider()).map_err(
        |e| {
            bad(format!(
                "the certificate is not for the key we generated: {e}"
            ))
        },
    )?;
    if let Some(pin) = pin {
        let pin = pin.to_ascii_lowercase();
        if !cas
            .iter()
            .any(|c| certs::bootstrap::ca_cert_hash(c).is_ok_and(|h| h == pin))
        {
            return Err(bad(format!(
                "the CA bundle does not hold the CA --ca-cert-hash {pin} names"
            )));
        }
    }
    let dir = &config.cert_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| EnrollError::Local(format!("cannot create {}: {e}", dir.display())))?;
    let _files = CERT_FILES.write().unwrap_or_else(|e| e.into_inner());
    let write = |name: &str, contents: &str, mode: u32| {
        certs::files::write_atomic(&dir.join(name), contents.as_bytes(), mode)
            .map_err(|e| EnrollError::Local(e.to_string()))
    };
    write(TLS_KEY, key_pem, 0o600)?;
    write(TLS_CRT, &issued.certificate, 0o644)?;
    write(CA_CRT, &issued.ca, 0o644)?;
    Ok(identity)
}

/// One renewal over a connection authenticated by the current
/// certificate.
pub async fn renew(config: &AgentConfig) -> Result<Identity, EnrollError> {
    let credentials = config
        .credentials()
        .map_err(|e| EnrollError::Local(e.to_string()))?;
    let addresses = credentials.identity.addresses.clone();
    let (key, csr) = CsrRequest::generate(&config.node, &addresses)
        .map_err(|e| EnrollError::Local(e.to_string()))?;
    let request = Message::Renew(proto::Renew { csr });
    let tls = |alpn: &[u8]| {
        credentials
            .tls(alpn)
            .map_err(|e| certs::tls::TlsConfigError::Verifier(e.to_string()))
    };
    let issued = ask(config, &request, &tls).await?;
    store(config, &key, &issued, &addresses, None)
}

/// When to renew a certificate valid from `not_before` to `not_after`:
/// two thirds of the way.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

/// Renews the certificate at two thirds of its lifetime, for as long as
/// the agent runs; enrolls again (with `bootstrap`, if any) once it has
/// expired.
pub async fn renew_loop(
    config: Arc<AgentConfig>,
    bootstrap: Option<Bootstrap>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::with(
        Duration::from_secs(5),
        Duration::from_secs(600),
        Duration::from_secs(3600),
    );
    loop {
        let now = unix_now();
        let wait = match config.credentials() {
            Ok(c) if c.identity.remaining(now) <= 0 => match &bootstrap {
                Some(bootstrap) => {
                    tracing::warn!("the agent certificate has expired: enrolling again");
                    match enroll(&config, bootstrap).await {
                        Ok(_) => {
                            backoff = Backoff::with(
                                Duration::from_secs(5),
                                Duration::from_secs(600),
                                Duration::from_secs(3600),
                            );
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(
                                "the agent certificate has expired and enrolling again failed \
                                 (it needs a new bootstrap token): {e}"
                            );
                            backoff.next_delay()
                        }
                    }
                }
                None => {
                    tracing::error!(
                        "the agent certificate has expired and cannot be renewed: enroll with a \
                         new bootstrap token or install a new certificate"
                    );
                    Duration::from_secs(300)
                }
            },
            Ok(c) => {
                let at = renew_at(c.identity.not_before, c.identity.not_after);
                if now >= at {
                    match renew(&config).await {
                        Ok(identity) => {
                            tracing::info!(
                                not_after = identity.not_after,
                                "certificate renewed: new connections use it"
                            );
                            backoff = Backoff::with(
                                Duration::from_secs(5),
                                Duration::from_secs(600),
                                Duration::from_secs(3600),
                            );
                            continue;
                        }
                        Err(e) => {
                            let delay = backoff.next_delay();
                            tracing::warn!(retry_in = ?delay, "certificate renewal failed: {e}");
                            delay
                        }
                    }
                } else {
                    // Look again at least every 10 minutes: someone may
                    // have replaced the files.
                    Duration::from_secs(((at - now) as u64).min(600))
                }
            }
            Err(e) => {
                tracing::warn!("cannot read the certificate to renew it: {e}");
                Duration::from_secs(60)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds() {
        assert_eq!(renew_at(0, 300), 200);
        assert_eq!(renew_at(1000, 1000), 1000);
        assert_eq!(renew_at(1000, 900), 1000);
    }
}
