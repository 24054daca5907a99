//! The identity a certificate carries: CN = node name, IP SANs = addresses.
//!
//! Addresses are canonical: an IPv4-mapped IPv6 SAN (`::ffff:a.b.c.d`) is
//! the IPv4 address it maps, as every socket and route in the tunnel
//! spells it (registered raw, it could never be routed to).

use std::net::IpAddr;

use x509_parser::prelude::*;

/// Node identity read from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub common_name: String,
    pub addresses: Vec<IpAddr>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// What the extended key usage extension allows; `None` when the
    /// certificate has none (any purpose, to a plain WebPKI verifier).
    pub usage: Option<KeyUsage>,
    /// The serial number, lowercase hex without leading zero bytes (as
    /// deny-lists and CRLs name certificates).
    pub serial: String,
    /// Which enrollment the certificate descends from (see [`LINEAGE_PREFIX`]):
    /// the same through every renewal, so a deny-list can refuse a stolen
    /// certificate together with every one renewed from it. `None` for
    /// certificates issued without enrollment.
    pub lineage: Option<String>,
}

/// The subject organizational unit that carries a certificate's lineage:
/// `edge-tunnel:lineage:ID`, where ID is random at each enrollment
/// ([`new_lineage`]), or the serial of a certificate renewed without one.
/// The server copies it into every renewal.
pub const LINEAGE_PREFIX: &str = "edge-tunnel:lineage:";

/// A lineage for a new enrollment: 64 random bits, hex.
pub fn new_lineage() -> String {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `id` can be a lineage: 1-64 lowercase letters, digits and '-'
/// (what [`new_lineage`] makes, and hex serials).
pub fn valid_lineage(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The purposes of an extended key usage extension the tunnel cares for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyUsage {
    pub client_auth: bool,
    pub server_auth: bool,
}

impl Identity {
    /// Whether the certificate says it is for TLS clients. Required of
    /// agents (and CONNECT clients) even though a plain verifier accepts a
    /// certificate without the extension: a server certificate from a
    /// third-party issuer with default usages must not double as an agent.
    pub fn is_client_certificate(&self) -> bool {
        self.usage.is_some_and(|u| u.client_auth)
    }

    /// Seconds of validity left at `now` (Unix seconds); negative once
    /// expired.
    pub fn remaining(&self, now: i64) -> i64 {
        self.not_after - now
    }

    /// Whether expiry is near at `now`: less than a third of the lifetime
    /// or 7 days left, whichever comes first.
    pub fn expiry_near(&self, now: i64) -> bool {
        let lifetime = (self.not_after - self.not_before).max(0);
        let left = self.remaining(now);
        left < lifetime / 3 || left < 7 * 86_400
    }
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

/// The common name of the standalone DNAT helper's client certificate
/// (`tunnel-certs dnat-helper`). The colon makes it an invalid node name,
/// so no agent certificate can carry it and the helper's certificate can
/// never register as an agent.
pub const DNAT_HELPER_CN: &str = "edge-tunnel:dnat-helper";

/// The prefix of a CONNECT client's common name (`tunnel-certs
/// connect-client --name NAME` issues `edge-tunnel:connect:NAME`). A
/// certificate from the tunnel CA is accepted on the mTLS CONNECT
/// listener only with this prefix (or as the DNAT helper): an agent's
/// certificate, which chains to the same CA, must not open tunnels to
/// other nodes.
pub const CONNECT_CLIENT_PREFIX: &str = "edge-tunnel:connect:";

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

/// `ip` as the tunnel spells it: an IPv4-mapped IPv6 address becomes the
/// IPv4 address it maps; anything else is unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// A certificate serial as deny-lists spell it: lowercase hex, leading
/// zero bytes (DER sign padding) dropped.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// A serial as a person writes it (hex, with or without `0x`, colons
/// allowed, any case) in the canonical form of [`serial_hex`].
pub fn parse_serial(text: &str) -> Result<String, String> {
    let hex = text.trim().to_ascii_lowercase();
    let hex = hex.trim_start_matches("0x").replace(':', "");
    if hex.is_empty() || hex.len() > 80 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{text:?} is not a serial: hexadecimal, at most 40 bytes"
        ));
    }
    Ok(serial_hex(&serial_bytes(&hex)))
}

/// The big-endian bytes of a hexadecimal serial (an odd digit count is
/// padded in front). Non-hex digits count as 0: parse with
/// [`parse_serial`] first.
pub fn serial_bytes(hex: &str) -> Vec<u8> {
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex.to_owned()
    };
    (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).unwrap_or(0))
        .collect()
}

/// What a CRL says: its number and the serials it revokes (as
/// [`serial_hex`] spells them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrlInfo {
    pub number: u64,
    pub revoked: Vec<String>,
}

/// Reads a DER CRL (no signature check: what a verifier built with it
/// enforces is rustls' business; this says which live connections it
/// names).
pub fn crl_info(der: &[u8]) -> Result<CrlInfo, IdentityError> {
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| IdentityError::Parse(format!("CRL: {e}")))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    Ok(CrlInfo {
        number,
        revoked: crl
            .iter_revoked_certificates()
            .map(|r| serial_hex(r.raw_serial()))
            .collect(),
    })
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
                    let ip = match bytes.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap()),
                        16 => IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap()),
                        _ => continue,
                    };
                    let ip = canonical_ip(ip);
                    if !addresses.contains(&ip) {
                        addresses.push(ip);
                    }
                }
            }
        }
        // Set only by our enrollment CA; anything else in the field is not
        // a lineage.
        let lineage = cert
            .subject()
            .iter_organizational_unit()
            .filter_map(|ou| ou.as_str().ok())
            .find_map(|ou| ou.strip_prefix(LINEAGE_PREFIX))
            .filter(|id| valid_lineage(id))
            .map(str::to_owned);
        let validity = cert.validity();
        let usage = match cert.extended_key_usage() {
            Ok(Some(eku)) => Some(KeyUsage {
                client_auth: eku.value.client_auth || eku.value.any,
                server_auth: eku.value.server_auth || eku.value.any,
            }),
            Ok(None) => None,
            Err(e) => return Err(IdentityError::Parse(e.to_string())),
        };
        Ok(Identity {
            common_name,
            addresses,
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            usage,
            serial: serial_hex(cert.raw_serial()),
            lineage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::Ca;

    #[test]
    fn serials_are_read_as_people_write_them() {
        assert_eq!(parse_serial("0X01:2F").unwrap(), "012f");
        assert_eq!(parse_serial(" 00ab ").unwrap(), "ab");
        assert_eq!(parse_serial("abc").unwrap(), "0abc");
        assert_eq!(serial_bytes("abc"), vec![0x0a, 0xbc]);
        for bad in ["", "0x", "xyz", &"a".repeat(81)] {
            assert!(parse_serial(bad).is_err(), "{bad:?}");
        }
    }

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
        assert!(id.is_client_certificate());
        // One day, backdated an hour.
        assert_eq!(id.not_after - id.not_before, 25 * 3600);
        assert!(id.expiry_near(id.not_after - 3600));
        assert!(
            id.expiry_near(id.not_before),
            "a one-day certificate is always near"
        );
    }

    #[test]
    fn a_certificate_without_extended_key_usage_is_no_client_certificate() {
        // What a third-party issuer with default usages writes: no EKU.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edge-1");
        let cert = params.self_signed(&key).unwrap();
        let id = Identity::from_der(cert.der()).unwrap();
        assert_eq!(id.usage, None);
        assert!(!id.is_client_certificate());
    }

    #[test]
    fn server_certificates_are_no_client_certificates() {
        let ca = Ca::generate("test-ca", 1).unwrap();
        let pem = ca
            .issue_server("tunnel-server", &["x".into()], &[], 365)
            .unwrap();
        let der = rustls_pemfile::certs(&mut pem.cert.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let id = Identity::from_der(&der).unwrap();
        assert!(!id.is_client_certificate());
        assert_eq!(
            id.usage,
            Some(KeyUsage {
                client_auth: false,
                server_auth: true
            })
        );
        let now = id.not_before + 3600;
        assert!(!id.expiry_near(now));
        assert!(id.expiry_near(id.not_after - 6 * 86_400));
        assert!(id.remaining(id.not_after + 1) < 0);
    }

    #[test]
    fn ipv4_mapped_sans_become_ipv4() {
        let ca = Ca::generate("test-ca", 1).unwrap();
        let ips: Vec<IpAddr> = [
            "::ffff:198.18.0.5",
            "198.18.0.5",
            "fd00::5",
            "::ffff:10.0.0.1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let pem = ca.issue_agent("edge-1", &ips, 1).unwrap();
        let der = rustls_pemfile::certs(&mut pem.cert.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let id = Identity::from_der(&der).unwrap();
        let want: Vec<IpAddr> = ["198.18.0.5", "fd00::5", "10.0.0.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(id.addresses, want, "canonical and without duplicates");
        assert_eq!(
            canonical_ip("::ffff:1.2.3.4".parse().unwrap()),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // Only the mapped form moves; IPv4-compatible and plain IPv6 stay.
        for same in ["::1.2.3.4", "fd00::1", "1.2.3.4"] {
            let ip: IpAddr = same.parse().unwrap();
            assert_eq!(canonical_ip(ip), ip);
        }
    }

    #[test]
    fn the_dnat_helper_identity_is_no_node_name() {
        assert!(validate_node_name(DNAT_HELPER_CN).is_err());
        let ca = Ca::generate("test-ca", 1).unwrap();
        let pem = ca.issue_dnat_helper(1).unwrap();
        let der = rustls_pemfile::certs(&mut pem.cert.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let id = Identity::from_der(&der).unwrap();
        assert_eq!(id.common_name, DNAT_HELPER_CN);
        assert!(id.addresses.is_empty());
    }

    /// A signed request carries the lineage the signer gives it, in the
    /// subject; a request's own subject fields are not copied.
    #[test]
    fn a_signed_request_carries_its_lineage() {
        let ca = Ca::generate("enroll CA", 1).unwrap();
        let addresses = ["198.18.1.2".parse().unwrap()];
        let (_key, csr) = crate::issue::CsrRequest::generate("edge-1", &addresses).unwrap();
        let sign = |lineage: &str| {
            let request = crate::issue::CsrRequest::from_der(&csr).unwrap();
            ca.sign_agent_request(
                request,
                "edge-1",
                &addresses,
                lineage,
                std::time::Duration::from_secs(3600),
            )
        };
        let lineage = new_lineage();
        assert!(valid_lineage(&lineage) && lineage.len() == 16, "{lineage}");
        let pem = sign(&lineage).unwrap();
        let der = crate::files::parse_certs(pem.as_bytes(), std::path::Path::new("t")).unwrap();
        let identity = Identity::from_der(&der[0]).unwrap();
        assert_eq!(identity.lineage.as_deref(), Some(lineage.as_str()));
        assert_eq!(identity.common_name, "edge-1");
        for bad in ["", "UPPER", "a b", &"x".repeat(65)] {
            assert!(
                matches!(sign(bad), Err(crate::issue::IssueError::BadLineage(_))),
                "{bad:?}"
            );
        }
        // Issued without enrollment: none.
        let plain = ca.issue_agent("edge-1", &addresses, 1).unwrap();
        let der =
            crate::files::parse_certs(plain.cert.as_bytes(), std::path::Path::new("t")).unwrap();
        assert_eq!(Identity::from_der(&der[0]).unwrap().lineage, None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            Identity::from_der(b"not a certificate"),
            Err(IdentityError::Parse(_))
        ));
    }
}
