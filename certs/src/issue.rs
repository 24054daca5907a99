//! Issuing a CA and the server and agent certificates it signs.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Why issuing failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("invalid DNS name {name:?} for a certificate: {source}")]
    BadDnsName { name: String, source: rcgen::Error },
    #[error("the CA certificate or key cannot be used: {0}")]
    BadCa(rcgen::Error),
    #[error("the CA key does not match the CA certificate")]
    CaKeyMismatch,
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("validity of {0} days is out of range (1..=36500)")]
    BadValidity(u32),
    #[error("validity of {0} days is too long for a leaf certificate (at most {MAX_LEAF_DAYS}: renew, don't outlive)")]
    LeafTooLong(u32),
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(String),
    #[error("{0:?} is not a lineage (1-64 lowercase letters, digits and '-')")]
    BadLineage(String),
}

/// What a certificate signing request asks for, read and its signature
/// checked; nothing from it is copied into a certificate except the public
/// key, the CN and the IP SANs the signer decides to grant.
pub struct CsrRequest {
    pub common_name: String,
    pub addresses: Vec<IpAddr>,
    params: rcgen::CertificateSigningRequestParams,
}

impl CsrRequest {
    /// Parses a DER PKCS#10 request and checks its self-signature (proof
    /// that the requester holds the private key). Requests with SANs other
    /// than IP addresses, or without a CN, are refused.
    pub fn from_der(der: &[u8]) -> Result<CsrRequest, IssueError> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(der.to_vec());
        let params = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| {
            IssueError::BadCsr(match e {
                rcgen::Error::RingUnspecified => "its signature does not verify".into(),
                other => other.to_string(),
            })
        })?;
        let common_name = match params.params.distinguished_name.get(&DnType::CommonName) {
            Some(value) => dn_value_text(value)
                .ok_or_else(|| IssueError::BadCsr("its common name is not text".into()))?,
            None => return Err(IssueError::BadCsr("it has no common name (CN)".into())),
        };
        let mut addresses = Vec::new();
        for san in &params.params.subject_alt_names {
            match san {
                SanType::IpAddress(ip) => {
                    let ip = crate::identity::canonical_ip(*ip);
                    if !addresses.contains(&ip) {
                        addresses.push(ip);
                    }
                }
                other => {
                    return Err(IssueError::BadCsr(format!(
                    "it asks for a subject alternative name other than an IP address ({other:?})"
                )))
                }
            }
        }
        Ok(CsrRequest {
            common_name,
            addresses,
            params,
        })
    }

    /// A CSR for `node` and `addresses` with a new key: the PEM private
    /// key and the DER request. The key never leaves the caller.
    pub fn generate(node: &str, addresses: &[IpAddr]) -> Result<(String, Vec<u8>), IssueError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(node);
        params.subject_alt_names = addresses.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        let key = KeyPair::generate()?;
        let csr = params.serialize_request(&key)?;
        Ok((key.serialize_pem(), csr.der().to_vec()))
    }
}

fn dn_value_text(value: &rcgen::DnValue) -> Option<String> {
    match value {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::TeletexString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::BmpString(_) | rcgen::DnValue::UniversalString(_) => None,
        _ => None,
    }
}

/// The longest validity of a leaf certificate `tunnel-certs` issues (the
/// CA/Browser Forum's 398 days): a stolen certificate must not stay good
/// for decades. CAs may live up to 100 years.
pub const MAX_LEAF_DAYS: u32 = 398;

/// A loaded CA that can sign leaves.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    pem: String,
}

impl Ca {
    /// A new self-signed CA, valid for `days`.
    pub fn generate(common_name: &str, days: u32) -> Result<Ca, IssueError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, days)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        Ok(Ca { cert, key, pem })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, IssueError> {
        let key = KeyPair::from_pem(key_pem).map_err(IssueError::BadCa)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).map_err(IssueError::BadCa)?;
        let cert = params.self_signed(&key).map_err(IssueError::BadCa)?;
        // Re-signing reproduces the public key of `key`; it must be the one
        // in the certificate on disk, or leaves would not verify.
        let (_, on_disk) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|_| IssueError::BadCa(rcgen::Error::CouldNotParseCertificate))?;
        let on_disk = on_disk
            .parse_x509()
            .map_err(|_| IssueError::BadCa(rcgen::Error::CouldNotParseCertificate))?;
        if on_disk.public_key().raw != key.public_key_der().as_slice() {
            return Err(IssueError::CaKeyMismatch);
        }
        Ok(Ca {
            cert,
            key,
            pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate and key as PEM (the certificate as loaded).
    pub fn pem(&self) -> Pem {
        Pem {
            cert: self.pem.clone(),
            key: self.key.serialize_pem(),
        }
    }

    /// A server certificate for the given DNS names and addresses.
    pub fn issue_server(
        &self,
        common_name: &str,
        dns: &[String],
        ips: &[IpAddr],
        days: u32,
    ) -> Result<Pem, IssueError> {
        let mut sans = Vec::new();
        for name in dns {
            sans.push(dns_san(name)?);
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.issue_leaf(common_name, sans, ExtendedKeyUsagePurpose::ServerAuth, days)
    }

    /// An agent certificate: CN = node name, IP SANs = the node's addresses.
    pub fn issue_agent(&self, node: &str, ips: &[IpAddr], days: u32) -> Result<Pem, IssueError> {
        let sans = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        self.issue_leaf(node, sans, ExtendedKeyUsagePurpose::ClientAuth, days)
    }

    /// A client certificate for the standalone DNAT helper: CN =
    /// [`crate::identity::DNAT_HELPER_CN`], no addresses. A server's
    /// `--feed-listen` serves the agent list only to this identity.
    pub fn issue_dnat_helper(&self, days: u32) -> Result<Pem, IssueError> {
        self.issue_leaf(
            crate::identity::DNAT_HELPER_CN,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            days,
        )
    }

    /// A client certificate for the mTLS CONNECT ingress: CN =
    /// [`crate::identity::CONNECT_CLIENT_PREFIX`] + `name` (e.g. for
    /// kube-apiserver's egress selector), no addresses.
    pub fn issue_connect_client(&self, name: &str, days: u32) -> Result<Pem, IssueError> {
        self.issue_leaf(
            &format!("{}{name}", crate::identity::CONNECT_CLIENT_PREFIX),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            days,
        )
    }

    /// Signs an agent certificate for a checked request: CN = `node`, IP
    /// SANs = `addresses`, OU = [`crate::identity::LINEAGE_PREFIX`] +
    /// `lineage`, client-auth only, valid for `validity` from now
    /// (backdated a tenth of that, at most 5 minutes, for clocks that
    /// lag). Only the request's public key is used from it.
    pub fn sign_agent_request(
        &self,
        request: CsrRequest,
        node: &str,
        addresses: &[IpAddr],
        lineage: &str,
        validity: std::time::Duration,
    ) -> Result<String, IssueError> {
        let mut request = request.params;
        if !crate::identity::valid_lineage(lineage) {
            return Err(IssueError::BadLineage(lineage.to_owned()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(node);
        params.distinguished_name.push(
            DnType::OrganizationalUnitName,
            format!("{}{lineage}", crate::identity::LINEAGE_PREFIX),
        );
        params.subject_alt_names = addresses.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        let validity: Duration =
            Duration::try_from(validity).map_err(|_| IssueError::BadValidity(0))?;
        let backdate = (validity / 10_i32).min(Duration::minutes(5));
        params.not_before = now - backdate;
        params.not_after = now + validity;
        request.params = params;
        let cert = request.signed_by(&self.cert, &self.key)?;
        Ok(cert.pem())
    }

    /// A CRL (PEM) signed by this CA revoking `serials` (big-endian
    /// bytes), numbered `number`, valid for `days`.
    pub fn crl(&self, serials: &[Vec<u8>], number: u64, days: u32) -> Result<String, IssueError> {
        if days == 0 || days > 3650 {
            return Err(IssueError::BadValidity(days));
        }
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(days.into()),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.cert, &self.key)?.pem()?)
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        days: u32,
    ) -> Result<Pem, IssueError> {
        if days > MAX_LEAF_DAYS {
            return Err(IssueError::LeafTooLong(days));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn dns_san(name: &str) -> Result<SanType, IssueError> {
    name.to_owned()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|source| IssueError::BadDnsName {
            name: name.to_owned(),
            source,
        })
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), IssueError> {
    if days == 0 || days > 36_500 {
        return Err(IssueError::BadValidity(days));
    }
    // Backdate a little so a node whose clock lags still accepts the cert.
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days.into());
    Ok(())
}
