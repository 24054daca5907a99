//! rustls configurations for both ends of the tunnel.
//!
//! TLS 1.3 only, ring as the crypto provider, client certificates required
//! and verified against the directory's `ca.crt`. Identity (CN, IP SANs) is
//! checked above this layer, once the handshake is done.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
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
    let mut roots = RootCertStore::empty();
    for ca in &dir.ca {
        roots.add(ca.clone()).map_err(TlsConfigError::BadCa)?;
    }
    Ok(Arc::new(roots))
}

/// Server side: presents `tls.crt`, requires a client certificate signed by `ca.crt`.
pub fn server_config(dir: &CertDir, alpn: &[u8]) -> Result<ServerConfig, TlsConfigError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider.clone())
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
