//! The server's TLS material, reloaded while it runs.
//!
//! Every TLS listener of the server presents the certificate of
//! `--cert-dir` through [`LiveTls`], and the agent listeners (and the feed)
//! verify client certificates against its `ca.crt` through it. A watcher
//! ([`watch`]) re-reads `tls.crt`, `tls.key`, `ca.crt` and the
//! `--deny-list` every `--reload-interval`; when they changed and parse,
//! new handshakes use the new material at once and established connections
//! are untouched. A broken file is refused with a log line (and
//! `edge_tunnel_certificate_reloads_total{result="error"}`), and the old
//! material stays. A CA rotation works with a `ca.crt` bundle holding the
//! old and the new CA.
//!
//! With enrollment on (`--enroll-ca-dir`), client certificates become
//! optional on the agent listeners (a node without one may only enroll),
//! and the chain presented includes the CA that issued the server
//! certificate, so that an agent holding only a `sha256:` pin of that CA
//! can authenticate the server.
//!
//! The deny-list revokes agent certificates by node name or serial; a
//! change closes the affected live connections within one reload interval,
//! and the same tick closes connections whose certificate expired while
//! connected.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use certs::Identity;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::registry::AgentHandle;
use crate::Shared;

/// Agent certificates that must not be accepted any more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DenyList {
    nodes: HashSet<String>,
    /// Lowercase hex, no leading zero bytes (as [`certs::identity::serial_hex`]).
    serials: HashSet<String>,
    /// Enrollments whose certificates, renewals included, are refused
    /// ([`certs::Identity::lineage`]).
    lineages: HashSet<String>,
}

/// Longest deny-list file read.
const MAX_DENY_LIST: usize = 4 << 20;

impl DenyList {
    /// Parses `node=NAME`, `serial=HEX` and `lineage=ID` lines (`#`
    /// comments, blank lines ignored); anything else is an error naming
    /// the line.
    pub fn parse(text: &str, path: &Path) -> Result<DenyList, String> {
        let mut list = DenyList::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| format!("{}:{}: {why}", path.display(), n + 1);
            match line.split_once('=') {
                Some(("node", name)) => {
                    certs::identity::validate_node_name(name).map_err(|e| bad(&e.to_string()))?;
                    list.nodes.insert(name.to_owned());
                }
                Some(("serial", hex)) => {
                    list.serials
                        .insert(certs::identity::parse_serial(hex).map_err(|e| bad(&e))?);
                }
                Some(("lineage", id)) => {
                    if !certs::identity::valid_lineage(id) {
                        return Err(bad(&format!(
                            "{id:?} is not a lineage (the ID of edge-tunnel:lineage:ID in a \
                             certificate's subject, as /v1/agents shows it)"
                        )));
                    }
                    list.lineages.insert(id.to_owned());
                }
                _ => {
                    return Err(bad(&format!(
                        "expected `node=NAME`, `serial=HEX` or `lineage=ID`, got {line:?}"
                    )))
                }
            }
        }
        Ok(list)
    }

    /// Why a certificate is denied, if it is.
    pub fn denies(&self, node: &str, serial: &str, lineage: Option<&str>) -> Option<String> {
        if self.nodes.contains(node) {
            return Some(format!("node {node:?} is on the deny-list"));
        }
        if self.serials.contains(serial) {
            return Some(format!("certificate serial {serial} is on the deny-list"));
        }
        if let Some(lineage) = lineage.filter(|l| self.lineages.contains(*l)) {
            return Some(format!(
                "certificate lineage {lineage} (its enrollment and every renewal) is on the deny-list"
            ));
        }
        None
    }

    pub fn len(&self) -> usize {
        self.nodes.len() + self.serials.len() + self.lineages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One consistent set of TLS material.
struct Material {
    certified: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
    deny: DenyList,
    /// Serials the `--crl` file revokes (the verifier refuses them at the
    /// handshake; this finds the live connections they name).
    crl_serials: HashSet<String>,
    /// The server certificate's identity (expiry for the metric).
    own: Identity,
    /// `ca.crt` as PEM text: the bundle enrolled agents are given.
    ca_pem: String,
    /// A hash of every file read, to see whether anything changed.
    fingerprint: u64,
}

/// Why the TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error(transparent)]
    Tls(#[from] certs::tls::TlsConfigError),
    #[error("tls.crt/tls.key in {dir}: {problem}")]
    Leaf { dir: PathBuf, problem: String },
    #[error("deny-list {0}")]
    DenyList(String),
    #[error("--crl {0}")]
    Crl(String),
}

/// The server's live certificate, key, client CA and deny-list.
pub struct LiveTls {
    cert_dir: PathBuf,
    deny_list: Option<PathBuf>,
    crl: Option<PathBuf>,
    /// Client certificates optional on the agent listeners, issuer CA in
    /// the chain presented (enrollment on).
    pub enrollment: bool,
    material: RwLock<Arc<Material>>,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls")
            .field("cert_dir", &self.cert_dir)
            .field("deny_list", &self.deny_list)
            .field("crl", &self.crl)
            .field("enrollment", &self.enrollment)
            .finish()
    }
}

fn read_limited(path: &Path, limit: usize) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() > limit {
        return Err(format!(
            "{} is {} bytes, more than the {limit} read",
            path.display(),
            bytes.len()
        ));
    }
    Ok(bytes)
}

impl LiveTls {
    /// Loads the material once; an error here stops the server from
    /// starting.
    pub fn load(
        cert_dir: &Path,
        deny_list: Option<&Path>,
        crl: Option<&Path>,
        enrollment: bool,
    ) -> Result<Arc<LiveTls>, LoadError> {
        let material = load_material(cert_dir, deny_list, crl, enrollment)?;
        Ok(Arc::new(LiveTls {
            cert_dir: cert_dir.to_owned(),
            deny_list: deny_list.map(Path::to_owned),
            crl: crl.map(Path::to_owned),
            enrollment,
            material: RwLock::new(Arc::new(material)),
        }))
    }

    fn current(&self) -> Arc<Material> {
        self.material
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A rustls server configuration for `alpn` that always uses the live
    /// material: client certificates required unless `optional_clients`
    /// (the agent listeners with enrollment on).
    pub fn server_config(
        self: &Arc<Self>,
        alpn: &[u8],
        optional_clients: bool,
    ) -> rustls::ServerConfig {
        let mut config = rustls::ServerConfig::builder_with_provider(certs::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(LiveVerifier {
                tls: self.clone(),
                mandatory: !optional_clients,
            }))
            .with_cert_resolver(Arc::new(LiveResolver(self.clone())));
        config.alpn_protocols = vec![alpn.to_vec()];
        certs::tls::without_resumption(&mut config);
        config
    }

    /// A resolver presenting the live server certificate, for a listener
    /// with other client roots (the TLS CONNECT ingress).
    pub fn resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(LiveResolver(self.clone()))
    }

    /// Re-reads the files. `Ok(true)`: something changed and the new
    /// material is in use; `Ok(false)`: nothing changed; `Err`: the new
    /// files are broken and the old material stays.
    pub fn reload(&self) -> Result<bool, LoadError> {
        let old = self.current();
        let files = (self.deny_list.as_deref(), self.crl.as_deref());
        if fingerprint(&self.cert_dir, files) == old.fingerprint {
            return Ok(false);
        }
        let new = load_material(&self.cert_dir, files.0, files.1, self.enrollment)?;
        if new.fingerprint == old.fingerprint {
            return Ok(false);
        }
        *self.material.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        Ok(true)
    }

    /// Whether `chain` (leaf first) still verifies against `ca.crt` as
    /// loaded now (and the CRL): false once the CA that issued it was
    /// removed from the bundle.
    pub fn trusts(&self, chain: &[rustls::pki_types::CertificateDer<'_>]) -> bool {
        let Some((leaf, rest)) = chain.split_first() else {
            return false;
        };
        self.current()
            .verifier
            .verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now())
            .is_ok()
    }

    /// Why an agent certificate is refused now, if it is.
    pub fn denies(&self, identity: &Identity) -> Option<String> {
        self.denies_node(
            &identity.common_name,
            &identity.serial,
            identity.lineage.as_deref(),
        )
    }

    /// Why a node with certificate `serial` of `lineage` is refused now,
    /// if it is.
    pub fn denies_node(&self, node: &str, serial: &str, lineage: Option<&str>) -> Option<String> {
        let material = self.current();
        if material.crl_serials.contains(serial) {
            return Some(format!("certificate serial {serial} is revoked by the CRL"));
        }
        material.deny.denies(node, serial, lineage)
    }

    /// `ca.crt` as loaded, PEM: what enrolled agents verify servers with.
    pub fn ca_pem(&self) -> String {
        self.current().ca_pem.clone()
    }

    /// When the server certificate expires (Unix seconds), and its identity.
    pub fn own(&self) -> Identity {
        self.current().own.clone()
    }
}

/// A hash of the files' contents (a missing file hashes as such): cheap
/// enough to compute every few seconds, and it sees a Kubernetes Secret
/// update (a symlink swap) as well as an edit in place.
fn fingerprint(cert_dir: &Path, (deny_list, crl): (Option<&Path>, Option<&Path>)) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for name in [
        certs::files::TLS_CRT,
        certs::files::TLS_KEY,
        certs::files::CA_CRT,
    ] {
        std::fs::read(cert_dir.join(name)).ok().hash(&mut h);
    }
    deny_list.map(|p| std::fs::read(p).ok()).hash(&mut h);
    crl.map(|p| std::fs::read(p).ok()).hash(&mut h);
    h.finish()
}

/// Longest CRL file read.
const MAX_CRL: usize = 16 << 20;

fn load_material(
    cert_dir: &Path,
    deny_list: Option<&Path>,
    crl: Option<&Path>,
    enrollment: bool,
) -> Result<Material, LoadError> {
    let fingerprint = fingerprint(cert_dir, (deny_list, crl));
    // `ca.crt` read once: the roots that verify agents and the bundle
    // handed to them (and compared to see whether it changed) are the
    // same bytes, whatever writes the file meanwhile.
    let ca_path = cert_dir.join(certs::files::CA_CRT);
    let ca_bytes = certs::files::read(&ca_path)?;
    let dir = certs::CertDir {
        chain: certs::files::read_certs(&cert_dir.join(certs::files::TLS_CRT))?,
        key: certs::files::read_key(&cert_dir.join(certs::files::TLS_KEY))?,
        ca: certs::files::parse_certs(&ca_bytes, &ca_path)?,
    };
    let leaf_problem = |problem: String| LoadError::Leaf {
        dir: cert_dir.to_owned(),
        problem,
    };
    let own = Identity::from_der(dir.leaf()).map_err(|e| leaf_problem(e.to_string()))?;
    if !own.usage.is_some_and(|u| u.server_auth) {
        return Err(leaf_problem(
            "the server certificate does not carry the serverAuth extended key usage: agents \
             would refuse it (tunnel-certs server, or cert-manager usages [server auth])"
                .into(),
        ));
    }
    let mut chain = dir.chain.clone();
    if enrollment {
        // An agent with only a pin of the CA needs the CA itself to verify
        // the chain: append the ca.crt certificates that issued the leaf.
        let issuers = issuers_of(dir.leaf(), &dir.ca);
        if issuers.is_empty() {
            return Err(leaf_problem(
                "with enrollment on, ca.crt must hold the CA that issued tls.crt: enrolled \
                 agents are given ca.crt to verify servers with"
                    .into(),
            ));
        }
        for ca in issuers {
            if !chain.contains(&ca) {
                chain.push(ca);
            }
        }
    }
    let certified = CertifiedKey::from_der(chain, dir.key.clone_key(), &certs::tls::provider())
        .map_err(|e| leaf_problem(e.to_string()))?;
    let mut crl_serials = HashSet::new();
    let verifier = match crl {
        None => certs::tls::client_verifier(certs::tls::roots_of(&dir.ca)?)?,
        Some(path) => {
            let bad = |why: String| LoadError::Crl(format!("{}: {why}", path.display()));
            let pem = read_limited(path, MAX_CRL).map_err(LoadError::Crl)?;
            let crls = rustls_pemfile::crls(&mut &pem[..])
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not PEM: {e}")))?;
            if crls.is_empty() {
                return Err(bad("holds no PEM CRL (X509 CRL)".into()));
            }
            for der in &crls {
                let info = certs::identity::crl_info(der).map_err(|e| bad(e.to_string()))?;
                crl_serials.extend(info.revoked);
            }
            // Only the leaf's status matters (the CAs are ours), and a
            // certificate of a CA no CRL covers is not refused for that.
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                certs::tls::roots_of(&dir.ca)?,
                certs::tls::provider(),
            )
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| bad(e.to_string()))?
        }
    };
    let deny = match deny_list {
        Some(path) => {
            let bytes = read_limited(path, MAX_DENY_LIST).map_err(LoadError::DenyList)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| LoadError::DenyList(format!("{} is not UTF-8", path.display())))?;
            DenyList::parse(&text, path).map_err(LoadError::DenyList)?
        }
        None => DenyList::default(),
    };
    let ca_pem = String::from_utf8(ca_bytes)
        .map_err(|_| leaf_problem(format!("{} is not UTF-8 PEM", ca_path.display())))?;
    if enrollment && ca_pem.len() > proto::MAX_ISSUED_PEM {
        return Err(leaf_problem(format!(
            "ca.crt is {} bytes; with enrollment on it is sent to agents, at most {} bytes",
            ca_pem.len(),
            proto::MAX_ISSUED_PEM
        )));
    }
    Ok(Material {
        certified: Arc::new(certified),
        verifier,
        deny,
        crl_serials,
        own,
        ca_pem,
        fingerprint,
    })
}

/// The certificates of `cas` whose subject is the issuer of `leaf`.
fn issuers_of(
    leaf: &CertificateDer<'static>,
    cas: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, leaf)) = X509Certificate::from_der(leaf) else {
        return Vec::new();
    };
    let issuer = leaf.issuer().as_raw();
    cas.iter()
        .filter(|ca| {
            X509Certificate::from_der(ca).is_ok_and(|(_, c)| c.subject().as_raw() == issuer)
        })
        .cloned()
        .collect()
}

#[derive(Debug)]
struct LiveResolver(Arc<LiveTls>);

impl ResolvesServerCert for LiveResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

#[derive(Debug)]
struct LiveVerifier {
    tls: Arc<LiveTls>,
    mandatory: bool,
}

impl ClientCertVerifier for LiveVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    /// No hints: the CA bundle may change under a running server, and an
    /// agent has one certificate to offer anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.tls
            .current()
            .verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls
            .current()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls
            .current()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.tls.current().verifier.supported_verify_schemes()
    }
}

/// Reloads the material every `interval` while the server runs, and on
/// every tick closes agent connections whose certificate is now denied or
/// has expired.
pub async fn watch(tls: Arc<LiveTls>, shared: Arc<Shared>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let ca_before = tls.ca_pem();
        // A few small files: read on the runtime, like the token file.
        match tls.reload() {
            Ok(true) => {
                if tls.ca_pem() != ca_before {
                    disconnect_untrusted(&tls, &shared).await;
                }
                shared.credentials_changed();
                let own = tls.own();
                shared.metrics.certificate_expiry.set(own.not_after);
                shared
                    .metrics
                    .certificate_reloads
                    .get_or_create(&[("result", "ok")])
                    .inc();
                tracing::info!(
                    not_after = own.not_after,
                    "reloaded the server certificate, CA bundle and deny-list: new handshakes use them"
                );
            }
            Ok(false) => {}
            Err(e) => {
                shared
                    .metrics
                    .certificate_reloads
                    .get_or_create(&[("result", "error")])
                    .inc();
                tracing::error!("changed TLS files refused, the old ones stay in use: {e}");
            }
        }
        disconnect_invalid(&tls, &shared);
    }
}

/// After `ca.crt` changed: closes every agent connection whose certificate
/// no longer chains to it (its CA was removed: what revokes every agent of
/// a CA at once). One signature check per agent, on the blocking pool: a
/// fleet of 10,000 takes about a second there, once per change of the
/// bundle, not per tick.
async fn disconnect_untrusted(tls: &Arc<LiveTls>, shared: &Shared) {
    let agents = shared.registry.snapshot();
    let check = tls.clone();
    let untrusted = tokio::task::spawn_blocking(move || {
        agents
            .into_iter()
            .filter(|a| a.link.peer_chain().is_some_and(|c| !check.trusts(&c)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for agent in untrusted {
        let reason = "the agent certificate no longer chains to ca.crt (its CA was removed)";
        let code = proto::codes::close::REVOKED;
        close_agent(shared, &agent, Invalid::new("untrusted", code, reason));
    }
}

/// Why an agent connection must close, as [`close_agent`] says it.
pub struct Invalid {
    /// `agents_disconnected{reason}`.
    pub label: &'static str,
    pub code: u32,
    pub reason: String,
}

impl Invalid {
    fn new(label: &'static str, code: u32, reason: impl Into<String>) -> Invalid {
        Invalid {
            label,
            code,
            reason: reason.into(),
        }
    }
}

/// Why `agent`'s certificate no longer admits it at `now` (Unix seconds),
/// if it does not: denied (deny-list, CRL) or expired.
pub fn invalid_now(tls: &LiveTls, agent: &AgentHandle, now: i64) -> Option<Invalid> {
    let denied = tls.denies_node(&agent.node, &agent.serial, agent.lineage.as_deref());
    match denied {
        Some(why) => Some(Invalid::new("revoked", proto::codes::close::REVOKED, why)),
        None if agent.not_after <= now => Some(Invalid::new(
            "expired",
            proto::codes::close::CERTIFICATE_EXPIRED,
            "the agent certificate expired while connected",
        )),
        None => None,
    }
}

/// Closes an agent connection for `why` (logged, counted), and takes it
/// out of the registry if it is the node's registered one (a handed-over
/// connection is not).
pub fn close_agent(shared: &Shared, agent: &AgentHandle, why: Invalid) {
    tracing::warn!(node = %agent.node, "closing the agent connection: {}", why.reason);
    shared
        .metrics
        .agents_disconnected
        .get_or_create(&[("reason", why.label)])
        .inc();
    agent.link.close(why.code, &why.reason);
    if shared.registry.deregister(agent) {
        shared
            .metrics
            .agents_connected
            .set(shared.registry.len() as i64);
    }
}

/// Closes every agent connection whose certificate is denied now or has
/// expired.
pub fn disconnect_invalid(tls: &LiveTls, shared: &Shared) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for agent in shared.registry.snapshot() {
        if let Some(why) = invalid_now(tls, &agent, now) {
            close_agent(shared, &agent, why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server directory: its certificate from `ca`, `ca.crt` = `bundle`.
    fn server_dir(ca: &certs::issue::Ca, bundle: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let leaf = ca
            .issue_server("tunnel-server", &["localhost".into()], &[], 1)
            .unwrap();
        certs::files::write_leaf_dir(dir.path(), &leaf, bundle, true).unwrap();
        dir
    }

    #[test]
    fn with_enrollment_the_bundle_must_hold_the_issuer_and_fit_an_answer() {
        let ca = certs::issue::Ca::generate("test CA", 1).unwrap();
        let own = ca.pem().cert;
        let dir = server_dir(&ca, &own);
        LiveTls::load(dir.path(), None, None, true).unwrap();

        let other = certs::issue::Ca::generate("other CA", 1)
            .unwrap()
            .pem()
            .cert;
        let dir = server_dir(&ca, &other);
        LiveTls::load(dir.path(), None, None, false).unwrap();
        let err = LiveTls::load(dir.path(), None, None, true).unwrap_err();
        assert!(err.to_string().contains("issued tls.crt"), "{err}");

        let big = format!(
            "{own}{}",
            other.repeat(proto::MAX_ISSUED_PEM / other.len() + 1)
        );
        let dir = server_dir(&ca, &big);
        let err = LiveTls::load(dir.path(), None, None, true).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    /// A resumed session would skip the client certificate check (and a
    /// CRL published since the first handshake): none are offered.
    #[test]
    fn no_session_is_resumed() {
        let ca = certs::issue::Ca::generate("test CA", 1).unwrap();
        let dir = server_dir(&ca, &ca.pem().cert);
        let tls = Arc::new(LiveTls::load(dir.path(), None, None, false).unwrap());
        for optional in [false, true] {
            let config = tls.server_config(b"edge-tunnel", optional);
            assert_eq!(config.send_tls13_tickets, 0);
            assert!(!config.session_storage.can_cache());
        }
    }

    #[test]
    fn deny_list_lines_name_their_problem() {
        let path = Path::new("deny");
        let list = DenyList::parse("# c\nnode=edge-1\nserial=0X01:2F\n", path).unwrap();
        assert!(list.denies("edge-1", "99", None).is_some());
        assert!(list.denies("edge-2", "012f", None).is_some());
        assert!(list.denies("edge-2", "99", None).is_none());
        let err = DenyList::parse("ip=1.2.3.4\n", path).unwrap_err();
        assert!(err.contains("deny:1"), "{err}");
        assert!(DenyList::parse("serial=xyz\n", path).is_err());
        let list = DenyList::parse("lineage=0a1b2c3d4e5f6071\n", path).unwrap();
        assert!(list
            .denies("edge-2", "99", Some("0a1b2c3d4e5f6071"))
            .is_some());
        assert!(list.denies("edge-2", "99", Some("ffff")).is_none());
        assert!(list.denies("edge-2", "99", None).is_none());
        let err = DenyList::parse("\nlineage=Not Hex\n", path).unwrap_err();
        assert!(
            err.contains("deny:2") && err.contains("not a lineage"),
            "{err}"
        );
    }
}
