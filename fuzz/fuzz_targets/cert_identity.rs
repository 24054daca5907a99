//! Certificate identity extraction on arbitrary DER.
//!
//! Input: the bytes of a would-be certificate. `Identity::from_der` is what
//! the server runs on an agent's leaf certificate (after the TLS handshake
//! verified it) and the agent on its own.
//! Checks: no panic; an identity's addresses are canonical (no
//! IPv4-mapped IPv6) and without duplicates; an error says what it is.
#![no_main]

use std::net::IpAddr;

use certs::identity::{canonical_ip, Identity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Identity::from_der(data) {
        Ok(id) => {
            for (i, ip) in id.addresses.iter().enumerate() {
                assert_eq!(canonical_ip(*ip), *ip, "{ip} is not canonical");
                if let IpAddr::V6(v6) = ip {
                    assert!(v6.to_ipv4_mapped().is_none());
                }
                assert!(!id.addresses[..i].contains(ip), "{ip} twice");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
