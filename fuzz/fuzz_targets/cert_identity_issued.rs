//! Certificate identity extraction on certificates the `certs` crate
//! issues from fuzzed names and addresses (`Ca::issue_agent`,
//! `Ca::issue_server`), as `tunnel-certs` does.
//!
//! Checks: issuing fails only for a DNS name rcgen cannot encode; the identity read back
//! is exactly what went in, canonicalized: the common name unchanged, the
//! IP SANs in order with IPv4-mapped IPv6 as IPv4 and duplicates dropped,
//! DNS SANs ignored.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use certs::identity::{canonical_ip, Identity};
use certs::issue::{Ca, IssueError};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    common_name: String,
    addresses: Vec<Address>,
    /// Server certificate with these DNS SANs; otherwise an agent one.
    server_dns: Option<Vec<String>>,
}

#[derive(Arbitrary, Debug)]
enum Address {
    V4([u8; 4]),
    V6([u8; 16]),
    /// `::ffff:a.b.c.d`, to exercise canonicalization.
    Mapped([u8; 4]),
}

impl Address {
    fn ip(&self) -> IpAddr {
        match *self {
            Address::V4(b) => IpAddr::from(b),
            Address::V6(b) => IpAddr::from(b),
            Address::Mapped(b) => IpAddr::V6(std::net::Ipv4Addr::from(b).to_ipv6_mapped()),
        }
    }
}

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::generate("fuzz-ca", 1).expect("a CA"))
}

fn der(pem: &str) -> Vec<u8> {
    let mut pem = pem.as_bytes();
    let mut certs = rustls_pemfile::certs(&mut pem);
    let der = certs.next().expect("one certificate").expect("valid PEM");
    assert!(certs.next().is_none());
    der.to_vec()
}

fuzz_target!(|input: Input| {
    let ips: Vec<IpAddr> = input.addresses.iter().take(40).map(Address::ip).collect();
    let issued = match &input.server_dns {
        Some(dns) => ca().issue_server(&input.common_name, dns, &ips, 1),
        None => ca().issue_agent(&input.common_name, &ips, 1),
    };
    let pem = match issued {
        Ok(pem) => pem,
        // Only a DNS name rcgen cannot encode may fail: any common name
        // with any addresses is issued.
        Err(e) => {
            assert!(
                matches!(e, IssueError::BadDnsName { .. }),
                "issuing {input:?} failed: {e}"
            );
            return;
        }
    };
    let id = Identity::from_der(&der(&pem.cert)).expect("an issued certificate has an identity");
    assert_eq!(id.common_name, input.common_name);
    let mut want: Vec<IpAddr> = Vec::new();
    for ip in ips.iter().map(|ip| canonical_ip(*ip)) {
        if !want.contains(&ip) {
            want.push(ip);
        }
    }
    assert_eq!(id.addresses, want);
});
