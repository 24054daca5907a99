//! Which edge addresses this server routes to agents and redirects with
//! DNAT. An agent's certificate names its addresses, but a certificate
//! (or the standalone DNAT helper's feed) naming `127.0.0.1`, `0.0.0.0`,
//! a link-local or multicast address, or one of this host's own addresses
//! would have the server hijack traffic that never was the edge's: such
//! addresses are never registered and never redirected. Operators can
//! narrow further to the edge ranges they use (`--agent-address-cidr`).

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use crate::dnat::rules::Prefix;

/// Why an address is never an edge address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forbidden {
    Loopback,
    Unspecified,
    LinkLocal,
    Multicast,
    Broadcast,
    /// One of this host's own addresses.
    OwnAddress,
    /// Outside every `--agent-address-cidr`.
    OutsideRange(Vec<Prefix>),
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Forbidden::Loopback => f.write_str("a loopback address"),
            Forbidden::Unspecified => f.write_str("the unspecified address"),
            Forbidden::LinkLocal => f.write_str("a link-local address"),
            Forbidden::Multicast => f.write_str("a multicast address"),
            Forbidden::Broadcast => f.write_str("the broadcast address"),
            Forbidden::OwnAddress => f.write_str("an address of the tunnel server's own host"),
            Forbidden::OutsideRange(ranges) => {
                let list: Vec<String> = ranges.iter().map(|p| p.to_string()).collect();
                write!(f, "outside the allowed edge ranges ({})", list.join(", "))
            }
        }
    }
}

/// The edge addresses this server accepts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Allowed edge ranges; empty: any address not forbidden by kind.
    pub ranges: Vec<Prefix>,
    /// Register agents whose addresses are loopback (a tunnel and its
    /// agents on one machine: the quickstart, the tests). Never applies to
    /// DNAT: a loopback address is never redirected.
    pub allow_loopback: bool,
}

impl AddressPolicy {
    pub fn new(ranges: Vec<Prefix>) -> Self {
        AddressPolicy {
            ranges,
            allow_loopback: false,
        }
    }

    /// Checks `ip` against its kind, `own` (this host's addresses) and
    /// the allowed ranges.
    pub fn check(&self, ip: IpAddr, own: &BTreeSet<IpAddr>) -> Result<(), Forbidden> {
        let ip = transport::net::canonical_ip(ip);
        if self.allow_loopback && ip.is_loopback() {
            return Ok(());
        }
        forbidden_kind(ip).map_or(Ok(()), Err)?;
        if own.contains(&ip) {
            return Err(Forbidden::OwnAddress);
        }
        if !self.ranges.is_empty() && !self.ranges.iter().any(|r| r.contains(ip)) {
            return Err(Forbidden::OutsideRange(self.ranges.clone()));
        }
        Ok(())
    }
}

/// Addresses that are never an edge's, whatever the host.
pub fn forbidden_kind(ip: IpAddr) -> Option<Forbidden> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some(Forbidden::Loopback)
            } else if v4.is_unspecified() {
                Some(Forbidden::Unspecified)
            } else if v4.is_link_local() {
                Some(Forbidden::LinkLocal)
            } else if v4.is_multicast() {
                Some(Forbidden::Multicast)
            } else if v4.is_broadcast() {
                Some(Forbidden::Broadcast)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_kind(IpAddr::V4(v4));
            }
            if v6.is_loopback() {
                Some(Forbidden::Loopback)
            } else if v6.is_unspecified() {
                Some(Forbidden::Unspecified)
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some(Forbidden::LinkLocal)
            } else if v6.is_multicast() {
                Some(Forbidden::Multicast)
            } else {
                None
            }
        }
    }
}

/// This host's own interface addresses (empty if they cannot be read;
/// the kind checks still apply).
pub fn own_addresses() -> BTreeSet<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return BTreeSet::new();
    };
    addrs
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn never_edge_addresses_are_forbidden() {
        let p = AddressPolicy::default();
        let none = BTreeSet::new();
        for (a, why) in [
            ("127.0.0.1", Forbidden::Loopback),
            ("0.0.0.0", Forbidden::Unspecified),
            ("169.254.169.254", Forbidden::LinkLocal),
            ("224.0.0.1", Forbidden::Multicast),
            ("255.255.255.255", Forbidden::Broadcast),
            ("::1", Forbidden::Loopback),
            ("::", Forbidden::Unspecified),
            ("fe80::1", Forbidden::LinkLocal),
            ("ff02::1", Forbidden::Multicast),
            ("::ffff:127.0.0.1", Forbidden::Loopback),
        ] {
            assert_eq!(p.check(ip(a), &none), Err(why), "{a}");
        }
        assert_eq!(p.check(ip("198.18.1.2"), &none), Ok(()));
        assert_eq!(p.check(ip("fd00::7"), &none), Ok(()));
    }

    #[test]
    fn own_addresses_and_ranges() {
        let own: BTreeSet<IpAddr> = [ip("10.0.0.5")].into();
        let p = AddressPolicy::new(vec!["198.18.0.0/15".parse().unwrap()]);
        assert_eq!(p.check(ip("10.0.0.5"), &own), Err(Forbidden::OwnAddress));
        assert!(matches!(
            p.check(ip("10.9.9.9"), &own),
            Err(Forbidden::OutsideRange(_))
        ));
        assert_eq!(p.check(ip("198.19.255.1"), &own), Ok(()));
    }

    #[test]
    fn loopback_only_when_allowed() {
        let own: BTreeSet<IpAddr> = [ip("127.0.0.1")].into();
        let mut p = AddressPolicy::default();
        assert_eq!(p.check(ip("127.0.0.1"), &own), Err(Forbidden::Loopback));
        p.allow_loopback = true;
        assert_eq!(p.check(ip("127.0.0.1"), &own), Ok(()));
        assert_eq!(p.check(ip("0.0.0.0"), &own), Err(Forbidden::Unspecified));
    }

    #[test]
    fn this_host_has_addresses() {
        // Loopback at least, on any machine the tests run on.
        assert!(own_addresses().iter().any(|a| a.is_loopback()));
    }
}
