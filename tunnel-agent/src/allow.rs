//! The agent's allow-list: the only targets it will dial.
//!
//! The tunnel is not an open proxy into the edge network: a `Dial` for a
//! target outside this list is answered `NotAllowed` without touching the
//! network. Default: the node's own certificate addresses on the kubelet
//! ports 10250 and 10255.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use transport::net::canonical_ip;

/// Kubelet ports allowed by default.
pub const DEFAULT_PORTS: [u16; 2] = [10250, 10255];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: HashMap<IpAddr, BTreeSet<u16>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid --allow {entry:?}: {reason} (expected HOST:PORT[,PORT...], e.g. 10.0.0.5:10250,9100 or [fd00::5]:10250)")]
pub struct AllowParseError {
    pub entry: String,
    pub reason: String,
}

impl AllowList {
    /// `addresses` × [`DEFAULT_PORTS`].
    pub fn default_for(addresses: &[IpAddr]) -> Self {
        let mut list = AllowList::default();
        for ip in addresses {
            list.add(*ip, &DEFAULT_PORTS);
        }
        list
    }

    pub fn add(&mut self, ip: IpAddr, ports: &[u16]) {
        self.entries
            .entry(canonical_ip(ip))
            .or_default()
            .extend(ports.iter().copied());
    }

    /// Parses one `HOST:PORT[,PORT...]` entry and adds it.
    pub fn add_entry(&mut self, entry: &str) -> Result<(), AllowParseError> {
        let err = |reason: &str| AllowParseError {
            entry: entry.to_owned(),
            reason: reason.to_owned(),
        };
        let (host, ports) = if let Some(rest) = entry.strip_prefix('[') {
            let (host, rest) = rest.split_once(']').ok_or_else(|| err("missing ']'"))?;
            let ports = rest
                .strip_prefix(':')
                .ok_or_else(|| err("missing ':' before the ports"))?;
            (host, ports)
        } else {
            entry
                .rsplit_once(':')
                .ok_or_else(|| err("missing ':PORT'"))?
        };
        let ip: IpAddr = host
            .parse()
            .map_err(|_| err("HOST must be an IP address"))?;
        let mut parsed = Vec::new();
        for p in ports.split(',') {
            match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => return Err(err(&format!("{p:?} is not a port (1-65535)"))),
                Ok(port) => parsed.push(port),
            }
        }
        self.add(ip, &parsed);
        Ok(())
    }

    pub fn permits(&self, target: SocketAddr) -> bool {
        self.entries
            .get(&canonical_ip(target.ip()))
            .is_some_and(|ports| ports.contains(&target.port()))
    }

    pub fn hosts(&self) -> impl Iterator<Item = &IpAddr> {
        self.entries.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<_> = self.entries.iter().collect();
        hosts.sort();
        for (i, (ip, ports)) in hosts.into_iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            match ip {
                IpAddr::V4(_) => write!(f, "{ip}:{}", ports.join(","))?,
                IpAddr::V6(_) => write!(f, "[{ip}]:{}", ports.join(","))?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_kubelet_ports_on_own_addresses() {
        let list = AllowList::default_for(&["198.18.1.2".parse().unwrap()]);
        assert!(list.permits("198.18.1.2:10250".parse().unwrap()));
        assert!(list.permits("198.18.1.2:10255".parse().unwrap()));
        assert!(!list.permits("198.18.1.2:22".parse().unwrap()));
        assert!(!list.permits("198.18.1.3:10250".parse().unwrap()));
        assert!(list.permits("[::ffff:198.18.1.2]:10250".parse().unwrap()));
    }

    #[test]
    fn parses_entries() {
        let mut list = AllowList::default();
        list.add_entry("10.0.0.5:10250,9100").unwrap();
        list.add_entry("[fd00::5]:443").unwrap();
        assert!(list.permits("10.0.0.5:9100".parse().unwrap()));
        assert!(list.permits("[fd00::5]:443".parse().unwrap()));
        assert_eq!(list.to_string(), "10.0.0.5:9100,10250 [fd00::5]:443");
    }

    #[test]
    fn rejects_bad_entries_with_a_reason() {
        let mut list = AllowList::default();
        for (entry, reason) in [
            ("10.0.0.5", "missing ':PORT'"),
            ("node-1:10250", "IP address"),
            ("10.0.0.5:0", "not a port"),
            ("10.0.0.5:10250,", "not a port"),
            ("10.0.0.5:http", "not a port"),
            ("[fd00::5:443", "missing ']'"),
            ("[fd00::5]443", "missing ':'"),
        ] {
            let e = list.add_entry(entry).unwrap_err();
            assert!(e.reason.contains(reason), "{entry}: {}", e.reason);
            assert!(e.to_string().contains("HOST:PORT"));
        }
        assert!(list.is_empty());
    }
}
