//! The identity a certificate carries: CN = node name, IP SANs = addresses.

use std::net::IpAddr;

use x509_parser::prelude::*;

/// Node identity read from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub common_name: String,
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("certificate has no common name (CN)")]
    NoCommonName,
    #[error("certificate common name is not UTF-8")]
    BadCommonName,
    #[error("{0:?} is not a valid Kubernetes node name (lowercase letters, digits, '-' and '.', at most 253 characters)")]
    BadNodeName(String),
}

/// Longest node name (a DNS-1123 subdomain, as Kubernetes node names are).
pub const MAX_NODE_NAME: usize = 253;

/// Checks that `node` is a DNS-1123 subdomain, as Kubernetes node names are.
pub fn validate_node_name(node: &str) -> Result<(), IdentityError> {
    let ok = !node.is_empty()
        && node.len() <= MAX_NODE_NAME
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !node.starts_with(['-', '.'])
        && !node.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadNodeName(node.to_owned()))
    }
}

impl Identity {
    /// Extracts the identity from a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .ok_or(IdentityError::NoCommonName)?
            .as_str()
            .map_err(|_| IdentityError::BadCommonName)?
            .to_owned();
        let mut addresses = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::IPAddress(bytes) = name {
                    match bytes.len() {
                        4 => addresses.push(IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap())),
                        16 => addresses.push(IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap())),
                        _ => {}
                    }
                }
            }
        }
        Ok(Identity {
            common_name,
            addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::Ca;

    #[test]
    fn agent_identity_round_trips() {
        let ca = Ca::generate("test-ca", 1).unwrap();
        let ips: Vec<IpAddr> = vec!["198.18.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let pem = ca.issue_agent("edge-1", &ips, 1).unwrap();
        let der = rustls_pemfile::certs(&mut pem.cert.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let id = Identity::from_der(&der).unwrap();
        assert_eq!(id.common_name, "edge-1");
        assert_eq!(id.addresses, ips);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            Identity::from_der(b"not a certificate"),
            Err(IdentityError::Parse(_))
        ));
    }
}
