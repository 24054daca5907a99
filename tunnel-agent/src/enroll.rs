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
    if let Err(e) = recover(&config.cert_dir) {
        return Some(e);
    }
    let dir = {
        let _files = CERT_FILES.read().unwrap_or_else(|e| e.into_inner());
        match CertDir::load(&config.cert_dir) {
            Ok(dir) => dir,
            Err(e) => return Some(e.to_string()),
        }
    };
    if let Err(e) = rustls::sign::CertifiedKey::from_der(
        dir.chain.clone(),
        dir.key.clone_key(),
        &certs::tls::provider(),
    ) {
        return Some(format!("tls.key does not go with tls.crt: {e}"));
    }
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
    let (issued, seen) = ask(config, &request, &tls).await?;
    let pin = bootstrap.ca_cert_hash.clone();
    let addresses = bootstrap.addresses.clone();
    store_blocking(config, key, issued, addresses, pin, seen).await
}

/// The server an answer came from: its chain and the name it was
/// verified for.
struct ServerSeen {
    chain: crate::register::ServerChain,
    name: String,
}

/// [`store`] on the blocking pool: three synced writes must not hold the
/// agent's one runtime worker (and every relay on it).
async fn store_blocking(
    config: &AgentConfig,
    key: String,
    issued: proto::Issued,
    addresses: Vec<IpAddr>,
    pin: Option<String>,
    seen: ServerSeen,
) -> Result<Identity, EnrollError> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let identity = store(&config, &key, &issued, &addresses, pin.as_deref(), &seen)?;
        // Connections registered with the old certificate move over.
        config.renewed.send_modify(|generation| *generation += 1);
        Ok(identity)
    })
    .await
    .unwrap_or_else(|e| {
        Err(EnrollError::Local(format!(
            "writing the certificate failed: {e}"
        )))
    })
}

/// The names the next key and certificate are written under before they
/// replace `tls.key` and `tls.crt`.
const NEXT_KEY: &str = "tls.key.next";
const NEXT_CRT: &str = "tls.crt.next";

/// Finishes or undoes a replacement a crash interrupted: the new key and
/// certificate are written as `.next` files, then renamed key first. Both
/// `.next` files left: the old pair is whole, drop them. Only the
/// certificate's left: the key was renamed, finish with the certificate.
/// Only the key's left: it was never paired, drop it.
pub fn recover(dir: &Path) -> Result<(), String> {
    let _files = CERT_FILES.write().unwrap_or_else(|e| e.into_inner());
    let (key, crt) = (dir.join(NEXT_KEY), dir.join(NEXT_CRT));
    let fail = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
    match (key.exists(), crt.exists()) {
        (true, _) => {
            let _ = std::fs::remove_file(&crt);
            std::fs::remove_file(&key).map_err(|e| fail("cannot remove tls.key.next", e))?;
            tracing::warn!(
                "an interrupted certificate replacement was undone (the old pair stays)"
            );
        }
        (false, true) => {
            std::fs::rename(&crt, dir.join(TLS_CRT))
                .map_err(|e| fail("cannot finish tls.crt.next", e))?;
            tracing::warn!("an interrupted certificate replacement was finished");
        }
        (false, false) => {}
    }
    Ok(())
}

/// Asks every server address in turn (QUIC, then HTTP/2 in `auto`) until
/// one answers `Issued` or refuses.
async fn ask(
    config: &AgentConfig,
    request: &Message,
    tls: &(dyn Fn(&[u8]) -> Result<rustls::ClientConfig, certs::tls::TlsConfigError> + Sync),
) -> Result<(proto::Issued, ServerSeen), EnrollError> {
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
                Ok((Message::Issued(issued), chain)) => {
                    return Ok((
                        issued,
                        ServerSeen {
                            chain,
                            name: target.server_name.clone(),
                        },
                    ))
                }
                Ok((Message::Refuse(r), _)) => return Err(EnrollError::Refused(r.reason)),
                Ok((other, _)) => {
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
    seen: &ServerSeen,
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
    // The bundle replaces ca.crt: it must verify the server that sent it,
    // or the next connection would trust nothing that answers.
    certs::tls::verify_server_chain(&cas, &seen.chain, &seen.name).map_err(|e| {
        bad(format!(
            "the CA bundle does not verify the server that sent it ({}): {e}",
            seen.name
        ))
    })?;
    let dir = &config.cert_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| EnrollError::Local(format!("cannot create {}: {e}", dir.display())))?;
    recover(dir).map_err(EnrollError::Local)?;
    let write = |name: &str, contents: &str, mode: u32| {
        certs::files::write_atomic(&dir.join(name), contents.as_bytes(), mode)
            .map_err(|e| EnrollError::Local(e.to_string()))
    };
    // Both written in full first; then two renames, key first (see
    // `recover` for a crash between them).
    write(NEXT_KEY, key_pem, 0o600)?;
    write(NEXT_CRT, &issued.certificate, 0o644)?;
    let replaced = {
        let _files = CERT_FILES.write().unwrap_or_else(|e| e.into_inner());
        let rename = |from: &str, to: &str| {
            std::fs::rename(dir.join(from), dir.join(to))
                .map_err(|e| EnrollError::Local(format!("cannot replace {to}: {e}")))
        };
        rename(NEXT_KEY, TLS_KEY)
            .and_then(|()| rename(NEXT_CRT, TLS_CRT))
            .and_then(|()| write(CA_CRT, &issued.ca, 0o644))
    };
    if let Err(e) = replaced {
        // Not left half-done for the running process: the old pair back,
        // or the new one whole.
        if let Err(undo) = recover(dir) {
            tracing::error!("{undo}; the next start tries again");
        }
        return Err(e);
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
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
    let (issued, seen) = ask(config, &request, &tls).await?;
    store_blocking(config, key, issued, addresses, None, seen).await
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
    let fresh = || {
        Backoff::with(
            Duration::from_secs(5),
            Duration::from_secs(600),
            Duration::from_secs(3600),
        )
    };
    let mut backoff = fresh();
    loop {
        let now = unix_now();
        let wait = match config.credentials() {
            Ok(c) if c.identity.remaining(now) <= 0 => match &bootstrap {
                Some(bootstrap) => {
                    tracing::warn!("the agent certificate has expired: enrolling again");
                    match enroll(&config, bootstrap).await {
                        Ok(_) => {
                            backoff = fresh();
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
                            backoff = fresh();
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

    fn pair(dir: &Path, node: &str) -> certs::issue::Pem {
        let ca = certs::issue::Ca::generate("test CA", 1).unwrap();
        let leaf = ca
            .issue_agent(node, &["127.0.0.1".parse().unwrap()], 1)
            .unwrap();
        certs::files::write_leaf_dir(dir, &leaf, &ca.pem().cert, true).unwrap();
        leaf
    }

    #[test]
    fn an_interrupted_replacement_is_undone_or_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let old = pair(dir, "edge-1");
        let new = certs::issue::Ca::generate("other CA", 1)
            .unwrap()
            .issue_agent("edge-1", &["127.0.0.1".parse().unwrap()], 1)
            .unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        // Crash before the first rename: both .next files, the old pair whole.
        std::fs::write(dir.join(NEXT_KEY), &new.key).unwrap();
        std::fs::write(dir.join(NEXT_CRT), &new.cert).unwrap();
        recover(dir).unwrap();
        assert_eq!(
            (read(TLS_KEY), read(TLS_CRT)),
            (old.key.clone(), old.cert.clone())
        );
        assert!(!dir.join(NEXT_KEY).exists() && !dir.join(NEXT_CRT).exists());
        // Crash between the renames: the new key in place, its certificate
        // still .next.
        std::fs::write(dir.join(TLS_KEY), &new.key).unwrap();
        std::fs::write(dir.join(NEXT_CRT), &new.cert).unwrap();
        recover(dir).unwrap();
        assert_eq!((read(TLS_KEY), read(TLS_CRT)), (new.key, new.cert));
    }

    /// An agent without a bootstrap token (renewal is on by default) that
    /// crashed between the two renames starts: the replacement is finished
    /// before the certificate is loaded (it refused to start, for good).
    #[test]
    fn a_start_finishes_an_interrupted_replacement() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        pair(dir, "edge-1");
        let ca = certs::issue::Ca::generate("other CA", 1).unwrap();
        let new = ca
            .issue_agent("edge-1", &["127.0.0.1".parse().unwrap()], 1)
            .unwrap();
        std::fs::write(dir.join(TLS_KEY), &new.key).unwrap();
        std::fs::write(dir.join(NEXT_CRT), &new.cert).unwrap();
        std::fs::write(dir.join(CA_CRT), &ca.pem().cert).unwrap();
        let config = AgentConfig::try_new("127.0.0.1:8443", dir, "edge-1", &[]);
        assert!(config.is_ok(), "{:?}", config.err());
        assert!(!dir.join(NEXT_CRT).exists());
    }

    #[test]
    fn a_key_that_does_not_match_needs_enrollment() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        pair(dir, "edge-1");
        let config =
            AgentConfig::without_certificate("127.0.0.1:8443", dir, "edge-1", &[]).unwrap();
        assert_eq!(needs_enrollment(&config), None);
        let other = certs::issue::Ca::generate("other CA", 1)
            .unwrap()
            .issue_agent("edge-1", &["127.0.0.1".parse().unwrap()], 1)
            .unwrap();
        std::fs::write(dir.join(TLS_KEY), &other.key).unwrap();
        let why = needs_enrollment(&config).unwrap();
        assert!(why.contains("tls.key"), "{why}");
        pair(dir, "edge-1");
        let config =
            AgentConfig::without_certificate("127.0.0.1:8443", dir, "edge-2", &[]).unwrap();
        assert!(needs_enrollment(&config).unwrap().contains("edge-2"));
    }

    #[test]
    fn renews_at_two_thirds() {
        assert_eq!(renew_at(0, 300), 200);
        assert_eq!(renew_at(1000, 1000), 1000);
        assert_eq!(renew_at(1000, 900), 1000);
    }
}
