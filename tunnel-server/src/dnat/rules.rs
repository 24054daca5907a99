//! Rendering and diffing the DNAT rules (no I/O).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::CHAIN;

/// An address family's rule set goes to iptables or ip6tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// A destination prefix: a single edge address (/32, /128) or a static CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub ip: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn host(ip: IpAddr) -> Prefix {
        Prefix {
            ip,
            len: if ip.is_ipv4() { 32 } else { 128 },
        }
    }

    pub fn family(&self) -> Family {
        Family::of(self.ip)
    }

    /// Whether `ip` lies in this prefix (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.ip, transport::net::canonical_ip(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.len)
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;

    /// `10.20.0.0/16`, `fd00::/64`, or a bare address.
    fn from_str(s: &str) -> Result<Prefix, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        // Normalise the address to its network, as iptables-save prints it.
        let ip = match ip {
            IpAddr::V4(v4) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        };
        Ok(Prefix { ip, len })
    }
}

/// One DNAT rule: TCP to `dst:port` goes to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub dst: Prefix,
    pub port: u16,
    pub to: SocketAddr,
}

impl Rule {
    /// The rule exactly as `iptables-save` prints it, so that rendering and
    /// reading back compare as plain strings.
    pub fn render(&self) -> String {
        let to = match self.to {
            SocketAddr::V4(a) => a.to_string(),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        format!(
            "-A {CHAIN} -d {} -p tcp -m tcp --dport {} -j DNAT --to-destination {to}",
            self.dst, self.port
        )
    }
}

/// What the chain of one family should hold.
pub fn desired(
    family: Family,
    addresses: impl IntoIterator<Item = IpAddr>,
    cidrs: &[Prefix],
    ports: &[u16],
    to: SocketAddr,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if Family::of(to.ip()) != family {
        return out;
    }
    let prefixes = addresses
        .into_iter()
        .map(Prefix::host)
        .chain(cidrs.iter().copied())
        .filter(|p| p.family() == family);
    for dst in prefixes {
        for &port in ports {
            out.insert(Rule { dst, port, to }.render());
        }
    }
    out
}

/// The parts of `iptables-save -t nat` output that concern us.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Current {
    pub chain_exists: bool,
    pub rules: BTreeSet<String>,
    pub jump_from_output: bool,
    pub jump_from_prerouting: bool,
}

/// The jump rule from a built-in chain, as `iptables-save` prints it.
pub fn jump(from: &str) -> String {
    format!("-A {from} -j {CHAIN}")
}

/// Reads our chain out of `iptables-save -t nat` output.
pub fn parse_save(save: &str) -> Current {
    let mut current = Current::default();
    let own = format!("-A {CHAIN} ");
    let mut in_nat = false;
    for line in save.lines() {
        let line = line.trim_end();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if line.starts_with(&format!(":{CHAIN} ")) {
            current.chain_exists = true;
        } else if line.starts_with(&own) {
            current.rules.insert(line.to_owned());
        } else if line == jump("OUTPUT") {
            current.jump_from_output = true;
        } else if line == jump("PREROUTING") {
            current.jump_from_prerouting = true;
        }
    }
    current
}

/// An `iptables-restore --noflush` script that makes `current` into
/// `desired` in one transaction, or `None` when nothing differs.
pub fn plan(current: &Current, desired: &BTreeSet<String>) -> Option<String> {
    let in_sync = current.chain_exists
        && current.jump_from_output
        && current.jump_from_prerouting
        && current.rules == *desired;
    if in_sync {
        return None;
    }
    let mut script = String::from("*nat\n");
    // Declaring the chain creates it, or flushes it if it exists: the rules
    // below then replace its whole content atomically.
    script.push_str(&format!(":{CHAIN} - [0:0]\n"));
    if !current.jump_from_output {
        script.push_str(&format!("-I OUTPUT 1 -j {CHAIN}\n"));
    }
    if !current.jump_from_prerouting {
        script.push_str(&format!("-I PREROUTING 1 -j {CHAIN}\n"));
    }
    for rule in desired {
        script.push_str(rule);
        script.push('\n');
    }
    script.push_str("COMMIT\n");
    Some(script)
}

/// A script that removes the jumps and the chain, or `None` if nothing is there.
pub fn cleanup(current: &Current) -> Option<String> {
    if !current.chain_exists && !current.jump_from_output && !current.jump_from_prerouting {
        return None;
    }
    let mut script = String::from("*nat\n");
    if current.jump_from_output {
        script.push_str(&format!("-D OUTPUT -j {CHAIN}\n"));
    }
    if current.jump_from_prerouting {
        script.push_str(&format!("-D PREROUTING -j {CHAIN}\n"));
    }
    if current.chain_exists {
        script.push_str(&format!("-F {CHAIN}\n-X {CHAIN}\n"));
    }
    script.push_str("COMMIT\n");
    Some(script)
}

/// A set of conntrack entries that no longer agree with the rules.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stale {
    /// Original destination (`ADDR/32` or `ADDR/128`).
    pub dst: String,
    pub port: u16,
    /// Reply source of the stale entries: the destination itself for
    /// connections made before its rule existed (not NATed), the old DNAT
    /// target for connections NATed by a rule that is gone. Connections
    /// the new rules NATed have a different reply source and are kept.
    pub reply_src: String,
}

/// Entries that may route around the rules after a change from `before`
/// to `after`: for a rule that appeared, connections to its destination
/// that were not NATed (a SYN retried before the rule existed would
/// otherwise keep its un-NATed entry); for a rule that disappeared,
/// connections NATed to its target.
pub fn stale_entries(before: &BTreeSet<String>, after: &BTreeSet<String>) -> BTreeSet<Stale> {
    let removed = before.difference(after).map(|r| (r, true));
    let added = after.difference(before).map(|r| (r, false));
    removed
        .chain(added)
        .filter_map(|(rule, removed)| {
            let mut words = rule.split_whitespace();
            let (mut dst, mut port, mut to) = (None, None, None);
            while let Some(w) = words.next() {
                match w {
                    "-d" => dst = words.next().map(str::to_owned),
                    "--dport" => port = words.next().and_then(|p| p.parse().ok()),
                    "--to-destination" => {
                        to = words
                            .next()
                            .and_then(|t| t.parse::<SocketAddr>().ok())
                            .map(|t| t.ip().to_string())
                    }
                    _ => {}
                }
            }
            let dst: String = dst?;
            let reply_src = if removed {
                to?
            } else {
                dst.split('/').next()?.to_owned()
            };
            Some(Stale {
                dst,
                port: port?,
                reply_src,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to() -> SocketAddr {
        "198.18.0.1:8081".parse().unwrap()
    }

    const SAVE: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j TUNNEL-DNAT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TUNNEL-DNAT - [0:0]
-A PREROUTING -j TUNNEL-DNAT
-A OUTPUT -j TUNNEL-DNAT
-A OUTPUT -d 10.0.0.0/8 -j RETURN
-A TUNNEL-DNAT -d 198.18.1.2/32 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081
COMMIT
";

    #[test]
    fn renders_in_iptables_save_form() {
        let rules = desired(
            Family::V4,
            ["198.18.1.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            &["10.20.0.0/16".parse().unwrap()],
            &[10250, 9100],
            to(),
        );
        let v: Vec<_> = rules.into_iter().collect();
        assert_eq!(
            v,
            [
                "-A TUNNEL-DNAT -d 10.20.0.0/16 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081",
                "-A TUNNEL-DNAT -d 10.20.0.0/16 -p tcp -m tcp --dport 9100 -j DNAT --to-destination 198.18.0.1:8081",
                "-A TUNNEL-DNAT -d 198.18.1.2/32 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081",
                "-A TUNNEL-DNAT -d 198.18.1.2/32 -p tcp -m tcp --dport 9100 -j DNAT --to-destination 198.18.0.1:8081",
            ]
        );
        let v6 = desired(
            Family::V6,
            ["fd00::2".parse().unwrap()],
            &[],
            &[10250],
            "[fd00::1]:8081".parse().unwrap(),
        );
        assert_eq!(
            v6.into_iter().next().unwrap(),
            "-A TUNNEL-DNAT -d fd00::2/128 -p tcp -m tcp --dport 10250 -j DNAT --to-destination [fd00::1]:8081"
        );
    }

    #[test]
    fn parses_only_the_nat_table() {
        let c = parse_save(SAVE);
        assert!(c.chain_exists && c.jump_from_output && c.jump_from_prerouting);
        assert_eq!(c.rules.len(), 1);
    }

    #[test]
    fn in_sync_means_no_change() {
        let c = parse_save(SAVE);
        let want = desired(
            Family::V4,
            ["198.18.1.2".parse().unwrap()],
            &[],
            &[10250],
            to(),
        );
        assert_eq!(plan(&c, &want), None);
    }

    #[test]
    fn plans_a_full_replacement_with_missing_jumps() {
        let want = desired(
            Family::V4,
            ["198.18.1.3".parse().unwrap()],
            &[],
            &[10250],
            to(),
        );
        let script = plan(&Current::default(), &want).unwrap();
        assert_eq!(
            script,
            "*nat\n:TUNNEL-DNAT - [0:0]\n-I OUTPUT 1 -j TUNNEL-DNAT\n-I PREROUTING 1 -j TUNNEL-DNAT\n\
             -A TUNNEL-DNAT -d 198.18.1.3/32 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081\nCOMMIT\n"
        );
        // Jumps already there are not added twice.
        let c = parse_save(SAVE);
        let script = plan(&c, &want).unwrap();
        assert!(!script.contains("-I OUTPUT"), "{script}");
    }

    #[test]
    fn cleanup_removes_what_exists_only() {
        assert_eq!(cleanup(&Current::default()), None);
        let script = cleanup(&parse_save(SAVE)).unwrap();
        assert_eq!(
            script,
            "*nat\n-D OUTPUT -j TUNNEL-DNAT\n-D PREROUTING -j TUNNEL-DNAT\n-F TUNNEL-DNAT\n-X TUNNEL-DNAT\nCOMMIT\n"
        );
    }

    #[test]
    fn stale_entries_are_the_difference() {
        let a = desired(
            Family::V4,
            ["198.18.1.2".parse().unwrap()],
            &[],
            &[10250],
            to(),
        );
        let b = desired(
            Family::V4,
            ["198.18.1.3".parse().unwrap()],
            &[],
            &[10250],
            to(),
        );
        let changed: Vec<_> = stale_entries(&a, &b).into_iter().collect();
        let stale = |dst: &str, reply_src: &str| Stale {
            dst: dst.to_owned(),
            port: 10250,
            reply_src: reply_src.to_owned(),
        };
        assert_eq!(
            changed,
            [
                // Gone: connections NATed to the server are stale.
                stale("198.18.1.2/32", "198.18.0.1"),
                // New: only connections that bypassed NAT are stale; new
                // connections through the rule (reply source 198.18.0.1)
                // must survive the flush.
                stale("198.18.1.3/32", "198.18.1.3"),
            ]
        );
        assert!(stale_entries(&a, &a).is_empty());
    }

    #[test]
    fn prefixes_parse_and_normalise() {
        assert_eq!(
            "10.20.3.4/16".parse::<Prefix>().unwrap().to_string(),
            "10.20.0.0/16"
        );
        assert_eq!(
            "10.0.0.1".parse::<Prefix>().unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert_eq!(
            "fd00::1:2/64".parse::<Prefix>().unwrap().to_string(),
            "fd00::/64"
        );
        assert!("10.0.0.0/33"
            .parse::<Prefix>()
            .unwrap_err()
            .contains("0..=32"));
        assert!("node-1/8".parse::<Prefix>().is_err());
    }
}
