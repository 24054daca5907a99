//! rustls configurations for both ends of the tunnel.
//!
//! TLS 1.3 only, ring as the crypto provider, client certificates required
//! and verified against the directory's `ca.crt`. Identity (CN, IP SANs) is
//! checked above this layer, once the handshake is done.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::files::CertDir;

/// Why a TLS configuration could not be built from a certificate directory.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("ca.crt is not a usable CA certificate: {0}")]
    BadCa(rustls::Error),
    #[error("tls.crt/tls.key are not a usable certificate and key: {0}")]
    BadLeaf(rustls::Error),
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(String),
}

/// The crypto provider both ends use.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(dir: &CertDir) -> Result<Arc<RootCertStore>, TlsConfigError> {
    roots_of(&dir.ca)
}

/// Server side: presents `tls.crt`, requires a client certificate signed by `ca.crt`.
pub fn server_config(dir: &CertDir, alpn: &[u8]) -> Result<ServerConfig, TlsConfigError> {
    server_config_for_clients(dir, roots(dir)?, alpn, ClientCertificate::Required)
}

/// Whether a listener's clients must present a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCertificate {
    /// The handshake fails without one that chains to the roots.
    Required,
    /// A client may present none (and is then authenticated some other
    /// way); one it presents must still chain to the roots.
    Optional,
}

/// The roots a set of CA certificates (e.g. `--connect-client-ca`) makes.
pub fn roots_of(cas: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(TlsConfigError::BadCa)?;
    }
    Ok(Arc::new(roots))
}

/// A verifier for client certificates chaining to `roots`, for checking
/// a certificate outside a handshake.
pub fn client_verifier(
    roots: Arc<RootCertStore>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsConfigError> {
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsConfigError::Verifier(e.to_string()))
}

/// Server side with other client roots: presents `tls.crt`, verifies
/// client certificates against `client_roots`.
pub fn server_config_for_clients(
    dir: &CertDir,
    client_roots: Arc<RootCertStore>,
    alpn: &[u8],
    clients: ClientCertificate,
) -> Result<ServerConfig, TlsConfigError> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(client_roots, provider.clone());
    let builder = match clients {
        ClientCertificate::Required => builder,
        ClientCertificate::Optional => builder.allow_unauthenticated(),
    };
    let verifier = builder
        .build()
        .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_single_cert(dir.chain.clone(), dir.key.clone_key())
        .map_err(TlsConfigError::BadLeaf)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    without_resumption(&mut config);
    Ok(config)
}

/// Every connection authenticates in full: no session tickets, no session
/// cache. A resumed TLS 1.3 session skips the client certificate check, so
/// a certificate revoked (CRL) after the first handshake would still get
/// in on a ticket; and agents stay connected for days, so resumption would
/// save nothing worth a ticket's CPU and a cache entry per handshake.
pub fn without_resumption(config: &mut ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// Server side presenting what `resolver` picks (a certificate reloaded
/// while the server runs), verifying client certificates against
/// `client_roots`.
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    client_roots: Arc<RootCertStore>,
    alpn: &[u8],
    clients: ClientCertificate,
) -> Result<ServerConfig, TlsConfigError> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(client_roots, provider.clone());
    let builder = match clients {
        ClientCertificate::Required => builder,
        ClientCertificate::Optional => builder.allow_unauthenticated(),
    };
    let verifier = builder
        .build()
        .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![alpn.to_vec()];
    without_resumption(&mut config);
    Ok(config)
}

/// Client (agent) side: verifies the server against `ca.crt` (and that
/// its certificate is for TLS servers), presents `tls.crt`.
pub fn client_config(dir: &CertDir, alpn: &[u8]) -> Result<ClientConfig, TlsConfigError> {
    let provider = provider();
    let verifier = ServerVerifier::roots(roots(dir)?)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(dir.chain.clone(), dir.key.clone_key())
        .map_err(TlsConfigError::BadLeaf)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// What an agent that has no certificate yet trusts the server by.
#[derive(Clone, Debug)]
pub enum EnrollTrust {
    /// A `ca.crt` it was given.
    Roots(Vec<CertificateDer<'static>>),
    /// A `sha256:HEX` pin of the CA's public key (`--ca-cert-hash`): the
    /// server must present that CA in its chain.
    Pin(String),
}

/// Client side without a certificate, for enrollment: verifies the server
/// by `trust`, presents nothing.
pub fn enroll_client_config(
    trust: &EnrollTrust,
    alpn: &[u8],
) -> Result<ClientConfig, TlsConfigError> {
    let verifier = match trust {
        EnrollTrust::Roots(cas) => ServerVerifier::roots(roots_of(cas)?)?,
        EnrollTrust::Pin(pin) => ServerVerifier {
            trust: Trust::Pin(pin.to_ascii_lowercase()),
        },
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Whether `chain` (leaf first), as a server presented it for
/// `server_name`, verifies against `cas` with the checks agents apply
/// (serverAuth included): an agent checks a CA bundle it is given before
/// it trusts only that.
pub fn verify_server_chain(
    cas: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    server_name: &str,
) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    let (leaf, rest) = chain
        .split_first()
        .ok_or_else(|| "the server presented no certificate".to_owned())?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| format!("server name {server_name:?}: {e}"))?;
    let verifier = ServerVerifier::roots(roots_of(cas).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(leaf, rest, &name, &[], rustls::pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[derive(Debug)]
enum Trust {
    Roots(Arc<WebPkiServerVerifier>),
    Pin(String),
}

/// Verifies a server certificate chain (against roots, or against the CA
/// a pin names, found in the chain the server sent), then requires the
/// serverAuth extended key usage: a plain verifier takes a certificate
/// without the extension as any purpose, so an agent's client certificate
/// (or one a third-party issuer made with default usages) could pose as a
/// server.
#[derive(Debug)]
struct ServerVerifier {
    trust: Trust,
}

impl ServerVerifier {
    fn roots(roots: Arc<RootCertStore>) -> Result<ServerVerifier, TlsConfigError> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
        Ok(ServerVerifier {
            trust: Trust::Roots(inner),
        })
    }

    fn inner(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        match &self.trust {
            Trust::Roots(v) => Ok(v.clone()),
            Trust::Pin(pin) => {
                let ca = intermediates
                    .iter()
                    .find(|c| crate::bootstrap::ca_cert_hash(c).is_ok_and(|h| &h == pin))
                    .ok_or_else(|| {
                        rustls::Error::General(format!(
                            "the server presented no CA certificate matching --ca-cert-hash {pin}"
                        ))
                    })?;
                let roots = roots_of(&[ca.clone().into_owned()])
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))
            }
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner(intermediates)?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let identity = crate::Identity::from_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if !identity.usage.is_some_and(|u| u.server_auth) {
            return Err(rustls::Error::General(format!(
                "server certificate {:?} is not for TLS servers (its extended key usage lacks \
                 serverAuth): issue it with `tunnel-certs server` or usages [server auth]",
                identity.common_name
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
