//! Enrollment with a bootstrap token, and renewal.
//!
//! With `--enroll-ca-dir DIR --enroll-tokens-file FILE`, an agent that has
//! no certificate yet connects to the agent port without one (the server
//! then asks for client certificates without requiring them) and sends
//! `Enroll`: a bootstrap token and a CSR for its node name and addresses.
//! The server checks the token (known, secret, not revoked, not expired,
//! uses left, node name or pattern), the CSR (its signature, a valid node
//! name, only IP SANs) and every address (`--agent-address-cidr` and the
//! other registration rules), signs a short-lived certificate (CN = node,
//! IP SANs = the addresses, client auth only, `--enroll-validity`),
//! records the use in the tokens file, and answers `Issued` with the
//! certificate and the CA bundle (`--cert-dir` `ca.crt`). The key never
//! leaves the node.
//!
//! An agent renews over a connection authenticated by its current
//! certificate: `Renew` with a CSR for the same node name and addresses
//! (a subset: renewal never widens an identity; a node whose address
//! changed enrolls again with a new token).
//!
//! Every enrollment, renewal and refusal is logged and counted
//! (`edge_tunnel_enrollments_total{result}`,
//! `edge_tunnel_renewals_total{result}`). At most
//! [`Enroller::MAX_CONCURRENT`] run at once; more are refused as `busy`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use certs::bootstrap::{BootstrapToken, TokensFile};
use certs::issue::{Ca, CsrRequest};
use certs::Identity;
use proto::{Issued, Refusal, RefuseCode};

use crate::Shared;

/// What the server needs to enroll agents.
pub struct Enroller {
    ca: Ca,
    tokens_file: PathBuf,
    /// Where uses are recorded when the tokens file is read-only (a
    /// Kubernetes Secret): `ID USED` lines, this replica's own count.
    state_file: Option<PathBuf>,
    validity: Duration,
    /// Serializes the read-check-record of the tokens file in this
    /// process (the file lock does it across processes).
    tokens_lock: std::sync::Mutex<()>,
    /// The enrollment CA's certificate, and the earlier enrollment CAs the
    /// operator listed after it in the directory's `ca.crt` (a routine
    /// rotation): only what they issued is renewed.
    ca_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Connections without a client certificate (which may only enroll)
    /// open now: at most [`Enroller::MAX_UNAUTHENTICATED`], and
    /// [`Enroller::MAX_UNAUTHENTICATED_PER_SOURCE`] from one source.
    unauthenticated: Arc<tokio::sync::Semaphore>,
    sources: crate::slots::ClientSlots,
    /// When each node last renewed (a compromised agent cannot make the
    /// server sign in a loop).
    renewed: dashmap::DashMap<String, std::time::Instant>,
    /// Refusals are logged at WARN at most once per interval.
    log: crate::log_throttle::LogThrottle,
}

/// A connection without a certificate, counted while it lives.
pub struct Unauthenticated {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _source: crate::slots::ClientClaim,
}

/// Why the enrollment CA could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EnrollSetupError {
    #[error("--enroll-ca-dir {dir}: {problem}")]
    Ca { dir: PathBuf, problem: String },
    #[error("--enroll-tokens-file {path}: {problem}")]
    Tokens { path: PathBuf, problem: String },
}

/// A refusal with the label it is counted under.
struct Refused {
    label: &'static str,
    reason: String,
}

fn refused(label: &'static str, reason: impl Into<String>) -> Refused {
    Refused {
        label,
        reason: reason.into(),
    }
}

/// Whom a certificate was issued to: node, addresses, lineage.
type Enrolled = (String, Vec<IpAddr>, String);

impl Enroller {
    /// Enrollments (and renewals) in progress at once.
    pub const MAX_CONCURRENT: usize = 8;
    /// Connections without a client certificate open at once: each has
    /// finished a handshake, so without this cap a peer could hold
    /// thousands for the register timeout.
    pub const MAX_UNAUTHENTICATED: usize = 64;
    /// Of those, from one IPv4 address or IPv6 /64.
    pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 4;
    /// How long such a connection may take to send `Enroll`.
    pub const ENROLL_TIMEOUT: Duration = Duration::from_secs(5);

    /// Loads the signing CA (the first certificate of `ca.crt`, and
    /// `ca.key`) and checks that the tokens file reads. Further
    /// certificates in `ca.crt` are earlier enrollment CAs whose agent
    /// certificates still renew (into the new CA's) while they are listed:
    /// a routine rotation lists the old one until every agent renewed; a
    /// rotation because the old CA leaked does not list it, and its
    /// agents enroll again with tokens.
    pub fn load(
        ca_dir: &std::path::Path,
        tokens_file: &std::path::Path,
        state_file: Option<&std::path::Path>,
        validity: Duration,
    ) -> Result<Enroller, EnrollSetupError> {
        let fail = |problem: String| EnrollSetupError::Ca {
            dir: ca_dir.to_owned(),
            problem,
        };
        let read = |name: &str| {
            std::fs::read_to_string(ca_dir.join(name))
                .map_err(|e| fail(format!("cannot read {name}: {e}")))
        };
        let ca_pem = read(certs::files::CA_CRT)?;
        let ca = Ca::from_pem(first_pem_block(&ca_pem), &read(certs::files::CA_KEY)?)
            .map_err(|e| fail(e.to_string()))?;
        let ca_der =
            certs::files::parse_certs(ca_pem.as_bytes(), &ca_dir.join(certs::files::CA_CRT))
                .map_err(|e| fail(e.to_string()))?;
        let ca_verifier = certs::tls::roots_of(&ca_der)
            .and_then(certs::tls::client_verifier)
            .map_err(|e| fail(e.to_string()))?;
        if ca_der.len() > 1 {
            tracing::info!(
                earlier = ca_der.len() - 1,
                "the enrollment CA's ca.crt lists earlier enrollment CAs: their agent \
                 certificates renew into this one's"
            );
        }
        TokensFile::load(tokens_file).map_err(|e| EnrollSetupError::Tokens {
            path: tokens_file.to_owned(),
            problem: e.to_string(),
        })?;
        Ok(Enroller {
            ca,
            tokens_file: tokens_file.to_owned(),
            state_file: state_file.map(|p| {
                if let Err(e) = read_state(p) {
                    tracing::warn!("--enroll-state-file: {e}; starting from no recorded uses");
                }
                p.to_owned()
            }),
            validity,
            tokens_lock: std::sync::Mutex::new(()),
            ca_verifier,
            slots: Arc::new(tokio::sync::Semaphore::new(Self::MAX_CONCURRENT)),
            unauthenticated: Arc::new(tokio::sync::Semaphore::new(Self::MAX_UNAUTHENTICATED)),
            sources: crate::slots::ClientSlots::new(
                Self::MAX_UNAUTHENTICATED,
                Self::MAX_UNAUTHENTICATED_PER_SOURCE,
            ),
            renewed: dashmap::DashMap::new(),
            log: crate::log_throttle::LogThrottle::default(),
        })
    }

    /// Admits a connection without a client certificate from `remote`, or
    /// says why not (counted as `busy`).
    pub fn admit_unauthenticated(
        &self,
        shared: &Shared,
        remote: std::net::SocketAddr,
    ) -> Result<Unauthenticated, String> {
        let refused = |why: String| {
            shared
                .metrics
                .enrollments
                .get_or_create(&[("result", "busy")])
                .inc();
            why
        };
        let slot = self
            .unauthenticated
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                refused(format!(
                    "{} connections without a certificate are open; retry shortly",
                    Self::MAX_UNAUTHENTICATED
                ))
            })?;
        let source = self.sources.claim(remote.ip(), "enroll").map_err(|_| {
            refused(format!(
                "{} connections without a certificate are open from {}; retry shortly",
                Self::MAX_UNAUTHENTICATED_PER_SOURCE,
                remote.ip()
            ))
        })?;
        Ok(Unauthenticated {
            _slot: slot,
            _source: source,
        })
    }

    /// One of the [`Enroller::MAX_CONCURRENT`] enrollments and renewals in
    /// progress, or `busy`.
    fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Refused> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            refused(
                "busy",
                "too many enrollments in progress on this server; retry shortly",
            )
        })
    }

    /// Logs a refusal: WARN at most once per interval (a flood of bad
    /// tokens must not become a log flood), DEBUG otherwise.
    fn log_refusal(&self, what: &str, who: &dyn std::fmt::Display, reason: &str) {
        match self.log.admit(std::time::Instant::now()) {
            Some(held_back) => {
                tracing::warn!(held_back, "{what} refused ({who}): {reason}")
            }
            None => tracing::debug!("{what} refused ({who}): {reason}"),
        }
    }

    /// Serves an `Enroll` from `remote`: the `Issued` to send, or the
    /// refusal. The file work runs on the blocking pool.
    pub async fn enroll(
        shared: Arc<Shared>,
        request: proto::Enroll,
        remote: std::net::SocketAddr,
    ) -> Result<Issued, Refusal> {
        // Only a parsed id is logged: a malformed "token" may be a secret
        // pasted alone.
        let token_id = BootstrapToken::parse(&request.token)
            .map(|t| t.id)
            .unwrap_or_else(|_| "<malformed>".into());
        let worker = shared.clone();
        let result = tokio::task::spawn_blocking(move || {
            let enroller = worker.enroller.as_ref().expect("enrollment is on");
            enroller.try_enroll(&worker, &request)
        })
        .await
        .unwrap_or_else(|e| {
            Err(refused(
                "signing_failed",
                format!("enrollment task failed: {e}"),
            ))
        });
        let enroller = shared.enroller.as_ref().expect("enrollment is on");
        let label = match &result {
            Ok((issued_for, _)) => {
                tracing::info!(
                    %remote,
                    node = %issued_for.0,
                    addresses = ?issued_for.1,
                    lineage = %issued_for.2,
                    token = %token_id,
                    "agent enrolled with a bootstrap token (a deny-list line lineage=ID refuses this certificate and its renewals)"
                );
                "issued"
            }
            Err(r) => {
                let who = format!("from {remote}, token {token_id}");
                enroller.log_refusal("enrollment", &who, &r.reason);
                r.label
            }
        };
        shared
            .metrics
            .enrollments
            .get_or_create(&[("result", label)])
            .inc();
        result.map(|(_, issued)| issued).map_err(|r| Refusal {
            code: RefuseCode::EnrollmentRefused,
            reason: r.reason,
        })
    }

    fn try_enroll(
        &self,
        shared: &Shared,
        request: &proto::Enroll,
    ) -> Result<(Enrolled, Issued), Refused> {
        let _slot = self.slot()?;
        if request.version_major != proto::VERSION_MAJOR {
            return Err(refused(
                "unsupported_version",
                format!(
                    "protocol version {} is not spoken here ({})",
                    request.version_major,
                    proto::VERSION_MAJOR
                ),
            ));
        }
        let token = BootstrapToken::parse(&request.token)
            .map_err(|e| refused("malformed_token", format!("bootstrap token: {e}")))?;
        let csr =
            CsrRequest::from_der(&request.csr).map_err(|e| refused("bad_csr", e.to_string()))?;
        let node = csr.common_name.clone();
        certs::identity::validate_node_name(&node)
            .map_err(|e| refused("bad_csr", format!("the CSR's common name: {e}")))?;
        let addresses = csr.addresses.clone();
        let lineage = certs::identity::new_lineage();
        // Under one lock: read the tokens (a revocation or a new token
        // applies at once), check, sign, record the use; the answer goes
        // out only once the use is recorded.
        let certificate = {
            let _lock = self.tokens_lock.lock().unwrap_or_else(|e| e.into_inner());
            let lock_path = self.state_file.as_deref().unwrap_or(&self.tokens_file);
            let _file_lock = certs::bootstrap::lock_file(lock_path).map_err(|e| {
                refused(
                    "tokens_file",
                    format!("the server cannot lock its tokens: {e}"),
                )
            })?;
            let mut file = TokensFile::load(&self.tokens_file).map_err(|e| {
                refused(
                    "tokens_file",
                    format!("the server cannot read its tokens file: {e}"),
                )
            })?;
            let mut state = match &self.state_file {
                Some(path) => Some(read_state(path).map_err(|e| refused("tokens_file", e))?),
                None => None,
            };
            if let Some(state) = &state {
                for record in &mut file.records {
                    record.used = record
                        .used
                        .saturating_add(state.get(&record.id).copied().unwrap_or(0));
                }
            }
            let now = unix_now();
            file.check(&token, &node, now).map_err(|r| match r {
                // The bearer knows the token: say whom it is for.
                certs::bootstrap::TokenRefusal::NodeNotAllowed => refused(
                    r.label(),
                    format!(
                        "node {node:?} may not enroll with bootstrap token {} (it is for {}): {r}",
                        token.id,
                        file.find(&token.id)
                            .map_or_else(String::new, |t| t.subject.to_string())
                    ),
                ),
                r => refused(r.label(), r.to_string()),
            })?;
            // Only a token holder learns what the address rules and the
            // registry say.
            check_addresses(shared, &addresses)?;
            // A node that is connected now has a certificate: a second one
            // from a (fleet) token would let its bearer pose as that node.
            if !matches!(
                shared.registry.by_node(&node),
                crate::registry::Route::NoAgent
            ) {
                return Err(refused(
                    "node_connected",
                    format!(
                        "node {node:?} is connected with a certificate already; it renews that \
                         one (to replace it, revoke it first)"
                    ),
                ));
            }
            // Fits an answer: the live material refuses a bigger bundle
            // while enrollment is on.
            let ca = shared.tls().ca_pem();
            let certificate = self
                .ca
                .sign_agent_request(csr, &node, &addresses, &lineage, self.validity)
                .map_err(|e| refused("signing_failed", e.to_string()))?;
            let recorded = match (&mut state, &self.state_file) {
                (Some(state), Some(path)) => {
                    *state.entry(token.id.clone()).or_insert(0) += 1;
                    write_state(path, state)
                }
                _ => {
                    let record = file.find_mut(&token.id).expect("checked above");
                    record.used += 1;
                    file.save(&self.tokens_file).map_err(|e| e.to_string())
                }
            };
            recorded.map_err(|e| {
                refused(
                    "tokens_file",
                    format!("the server cannot record the token's use: {e}"),
                )
            })?;
            (certificate, ca)
        };
        let (certificate, ca) = certificate;
        Ok(((node, addresses, lineage), Issued { certificate, ca }))
    }

    /// Serves a `Renew` on a connection authenticated as `identity` with
    /// the chain `presented`.
    pub fn renew(
        &self,
        shared: &Shared,
        identity: &Identity,
        presented: &[rustls::pki_types::CertificateDer<'static>],
        request: &proto::Renew,
    ) -> Result<Issued, Refusal> {
        let result = self.try_renew(shared, identity, presented, request);
        let label = match &result {
            Ok(_) => {
                tracing::info!(node = %identity.common_name, "agent certificate renewed");
                "issued"
            }
            Err(r) => {
                let who = format!("node {}", identity.common_name);
                self.log_refusal("renewal", &who, &r.reason);
                r.label
            }
        };
        shared
            .metrics
            .renewals
            .get_or_create(&[("result", label)])
            .inc();
        result.map_err(|r| Refusal {
            code: RefuseCode::EnrollmentRefused,
            reason: r.reason,
        })
    }

    /// Whether `presented` (leaf first) chains to an enrollment CA of
    /// `ca.crt`.
    fn issued_here(&self, presented: &[rustls::pki_types::CertificateDer<'_>]) -> bool {
        presented.split_first().is_some_and(|(leaf, rest)| {
            self.ca_verifier
                .verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now())
                .is_ok()
        })
    }

    /// Claims `node`'s renewal at `now`: refused within the cooldown of
    /// the last claim (a tenth of the validity, at most a minute). Checked
    /// and claimed in one step (the entry's lock), so two renewals of one
    /// node at once cannot both pass; a renewal refused after its claim
    /// still counts, and the node asks again after the cooldown.
    fn claim_renewal(&self, node: &str, now: std::time::Instant) -> Result<(), Refused> {
        let cooldown = (self.validity / 10).min(Duration::from_secs(60));
        match self.renewed.entry(node.to_owned()) {
            dashmap::Entry::Occupied(last)
                if now.saturating_duration_since(*last.get()) < cooldown =>
            {
                Err(refused(
                    "too_soon",
                    format!("node {node:?} renewed less than {cooldown:?} ago"),
                ))
            }
            dashmap::Entry::Occupied(mut last) => {
                last.insert(now);
                Ok(())
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(now);
                Ok(())
            }
        }
    }

    fn try_renew(
        &self,
        shared: &Shared,
        identity: &Identity,
        presented: &[rustls::pki_types::CertificateDer<'static>],
        request: &proto::Renew,
    ) -> Result<Issued, Refused> {
        // Only agent certificates the enrollment CA issued (or an earlier
        // one the operator still lists): not the DNAT helper's or a CONNECT
        // client's, and not one of a CA rotated out unlisted (a leaked old
        // CA must not mint its way into the new).
        certs::identity::validate_node_name(&identity.common_name).map_err(|_| {
            refused(
                "not_an_agent",
                format!(
                    "{:?} is no node name: only agent certificates renew",
                    identity.common_name
                ),
            )
        })?;
        if !self.issued_here(presented) {
            return Err(refused(
                "not_an_agent",
                "only certificates of the enrollment CA renew; enroll this node with a token",
            ));
        }
        let _slot = self.slot()?;
        // One renewal per node per tenth of the validity (at most a
        // minute): a compromised agent cannot make the server sign in a
        // loop; a real one renews at two thirds.
        let now = std::time::Instant::now();
        self.claim_renewal(&identity.common_name, now)?;
        let csr =
            CsrRequest::from_der(&request.csr).map_err(|e| refused("bad_csr", e.to_string()))?;
        if csr.common_name != identity.common_name {
            return Err(refused(
                "node_mismatch",
                format!(
                    "the CSR is for {:?}, the certificate renewing it for {:?}",
                    csr.common_name, identity.common_name
                ),
            ));
        }
        if let Some(extra) = csr
            .addresses
            .iter()
            .find(|a| !identity.addresses.contains(a))
        {
            return Err(refused(
                "address_not_in_certificate",
                format!(
                    "the CSR adds {extra}, which the current certificate does not carry: \
                     renewal never widens a certificate; enroll with a new token"
                ),
            ));
        }
        let addresses = csr.addresses.clone();
        check_addresses(shared, &addresses)?;
        // The renewal carries its lineage on (a certificate issued
        // without one starts its own, named by its serial): a deny-list
        // line for the lineage refuses every certificate renewed from a
        // stolen one, whose serials nobody else knows.
        let lineage = identity
            .lineage
            .clone()
            .unwrap_or_else(|| identity.serial.clone());
        let certificate = self
            .ca
            .sign_agent_request(
                csr,
                &identity.common_name,
                &addresses,
                &lineage,
                self.validity,
            )
            .map_err(|e| refused("signing_failed", e.to_string()))?;
        // Bounded: entries older than a minute go when the map grows.
        if self.renewed.len() > 100_000 {
            self.renewed
                .retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(60));
        }
        Ok(Issued {
            certificate,
            ca: shared.tls().ca_pem(),
        })
    }
}

/// Every address must be one the server would register for an agent.
fn check_addresses(shared: &Shared, addresses: &[IpAddr]) -> Result<(), Refused> {
    let own = crate::addresses::own_addresses();
    for a in addresses {
        shared.config.addresses.check(*a, &own).map_err(|why| {
            refused(
                "address_not_allowed",
                format!("address {a} cannot be given to an edge node: {why}"),
            )
        })?;
    }
    Ok(())
}

/// Most tokens the state file may name.
const MAX_STATE_ENTRIES: usize = 100_000;

/// Reads `ID USED` lines; a missing file is no uses.
fn read_state(path: &std::path::Path) -> Result<std::collections::HashMap<String, u32>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut state = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("{}:{}: expected `ID USED`", path.display(), n + 1);
        let (id, used) = line.split_once(' ').ok_or_else(bad)?;
        let used: u32 = used.trim().parse().map_err(|_| bad())?;
        if state.len() >= MAX_STATE_ENTRIES {
            return Err(format!(
                "{} names more than {MAX_STATE_ENTRIES} tokens",
                path.display()
            ));
        }
        state.insert(id.to_owned(), used);
    }
    Ok(state)
}

fn write_state(
    path: &std::path::Path,
    state: &std::collections::HashMap<String, u32>,
) -> Result<(), String> {
    let mut ids: Vec<_> = state.iter().collect();
    ids.sort();
    let mut text = String::from(
        "# edge-tunnel enrollment state: uses of each bootstrap token on this server\n",
    );
    for (id, used) in ids {
        text.push_str(&format!("{id} {used}\n"));
    }
    certs::files::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| e.to_string())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The first PEM block of `text` (the signing CA of a bundle), or all of it
/// when there is no end marker (the parser then names the problem).
fn first_pem_block(text: &str) -> &str {
    const END: &str = "-----END CERTIFICATE-----";
    match text.find(END) {
        Some(at) => &text[..at + END.len()],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_cert(ca: &Ca, node: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        let pem = ca
            .issue_agent(node, &["198.18.1.2".parse().unwrap()], 30)
            .unwrap();
        certs::files::parse_certs(pem.cert.as_bytes(), std::path::Path::new("agent.crt")).unwrap()
    }

    fn enroller(dir: &std::path::Path, signing: &Ca, earlier: &[&Ca]) -> Enroller {
        let mut bundle = signing.pem().cert;
        for ca in earlier {
            bundle.push_str(&ca.pem().cert);
        }
        std::fs::write(dir.join(certs::files::CA_CRT), bundle).unwrap();
        std::fs::write(dir.join(certs::files::CA_KEY), signing.pem().key).unwrap();
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, "").unwrap();
        Enroller::load(dir, &tokens, None, Duration::from_secs(30 * 86400)).unwrap()
    }

    /// A rotation: the new enrollment CA signs, and the agents of the old
    /// one renew while the operator lists it after the new one; unlisted
    /// (it leaked), they do not.
    #[test]
    fn earlier_enrollment_cas_listed_in_ca_crt_still_renew() {
        let dir = tempfile::tempdir().unwrap();
        let old = Ca::generate("enroll-ca-1", 365).unwrap();
        let new = Ca::generate("enroll-ca-2", 365).unwrap();
        let other = Ca::generate("someone-else", 365).unwrap();
        let rotating = enroller(dir.path(), &new, &[&old]);
        assert!(rotating.issued_here(&agent_cert(&new, "edge-1")));
        assert!(rotating.issued_here(&agent_cert(&old, "edge-2")));
        assert!(!rotating.issued_here(&agent_cert(&other, "edge-3")));
        // What it signs is the new CA's.
        assert_eq!(
            rotating.ca.pem().cert.trim(),
            new.pem().cert.trim(),
            "the first certificate signs"
        );
        let after = enroller(dir.path(), &new, &[]);
        assert!(after.issued_here(&agent_cert(&new, "edge-1")));
        assert!(!after.issued_here(&agent_cert(&old, "edge-2")));
    }

    /// One renewal per node per cooldown, however many ask at once.
    #[test]
    fn one_renewal_per_node_is_claimed_per_cooldown() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("enroll-ca", 365).unwrap();
        let enroller = std::sync::Arc::new(enroller(dir.path(), &ca, &[]));
        let now = std::time::Instant::now();
        let claimed: usize = std::thread::scope(|s| {
            let racers: Vec<_> = (0..8)
                .map(|_| s.spawn(|| enroller.claim_renewal("edge-1", now).is_ok()))
                .collect();
            racers
                .into_iter()
                .map(|r| usize::from(r.join().unwrap()))
                .sum()
        });
        assert_eq!(claimed, 1);
        let refusal = enroller.claim_renewal("edge-1", now).unwrap_err();
        assert_eq!(refusal.label, "too_soon");
        assert!(enroller.claim_renewal("edge-2", now).is_ok());
        // A minute on (the cooldown's cap), the node renews again.
        let later = now + Duration::from_secs(61);
        assert!(enroller.claim_renewal("edge-1", later).is_ok());
    }

    #[test]
    fn the_first_pem_block_is_the_signing_ca() {
        let text = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            first_pem_block(text),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
        );
        assert_eq!(first_pem_block("garbage"), "garbage");
    }
}
