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
    Ok(config)
}

/// Client (agent) side: verifies the server against `ca.crt`, presents `tls.crt`.
pub fn client_config(dir: &CertDir, alpn: &[u8]) -> Result<ClientConfig, TlsConfigError> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir)?, provider.clone())
        .build()
        .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(dir.chain.clone(), dir.key.clone_key())
        .map_err(TlsConfigError::BadLeaf)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}
