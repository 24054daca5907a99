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

/// Most ports one `-m multiport --dports` match takes (an iptables limit).
pub const MULTIPORT_MAX: usize = 15;

/// The built-in chains that jump to ours: `OUTPUT` (host processes such as
/// kube-apiserver) and `PREROUTING` (pods such as Prometheus).
pub const JUMP_FROM: [&str; 2] = ["OUTPUT", "PREROUTING"];

/// What the chain of one family should hold, and which traffic enters it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The DNAT rules, as `iptables-save` prints them.
    pub rules: BTreeSet<String>,
    /// The match on the jumps from [`JUMP_FROM`] (see [`jump_match`]).
    pub jump_match: String,
}

impl Desired {
    /// The jump rules from [`JUMP_FROM`], as `iptables-save` prints them.
    pub fn jumps(&self) -> [String; 2] {
        JUMP_FROM.map(|from| jump(from, &self.jump_match))
    }
}

/// The match of the jumps into our chain: TCP to the redirected ports, so
/// other traffic never traverses the chain. Every rule in the chain is TCP
/// to one of these ports, so nothing the chain would redirect is missed.
/// Past [`MULTIPORT_MAX`] ports, TCP only.
pub fn jump_match(ports: &[u16]) -> String {
    let mut ports: Vec<u16> = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() || ports.len() > MULTIPORT_MAX {
        return "-p tcp".to_owned();
    }
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("-p tcp -m multiport --dports {}", list.join(","))
}

/// A jump rule from a built-in chain, as `iptables-save` prints it.
pub fn jump(from: &str, matches: &str) -> String {
    if matches.is_empty() {
        format!("-A {from} -j {CHAIN}")
    } else {
        format!("-A {from} {matches} -j {CHAIN}")
    }
}

/// What the chain of one family should hold.
pub fn desired(
    family: Family,
    addresses: impl IntoIterator<Item = IpAddr>,
    cidrs: &[Prefix],
    ports: &[u16],
    to: SocketAddr,
) -> Desired {
    let mut out = Desired {
        rules: BTreeSet::new(),
        jump_match: jump_match(ports),
    };
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
            out.rules.insert(Rule { dst, port, to }.render());
        }
    }
    out
}

/// The parts of `iptables-save -t nat` output that concern us.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Current {
    pub chain_exists: bool,
    pub rules: BTreeSet<String>,
    /// Every rule of the nat table that jumps to our chain, as printed
    /// (`-A OUTPUT -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT`), in
    /// order, duplicates kept. Jumps of an older format (no match, other
    /// ports) are here too: [`plan`] replaces them, [`cleanup`] removes them.
    pub jumps: Vec<String>,
}

/// Reads our chain out of `iptables-save -t nat` output.
pub fn parse_save(save: &str) -> Current {
    let mut current = Current::default();
    let own = format!("-A {CHAIN} ");
    let target = format!(" -j {CHAIN}");
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
        } else if line.starts_with("-A ") && line.ends_with(&target) {
            current.jumps.push(line.to_owned());
        }
    }
    current
}

/// `-A CHAIN spec` as the `-D CHAIN spec` that deletes it.
fn delete(appended: &str) -> String {
    format!("-D {}", appended.strip_prefix("-A ").unwrap_or(appended))
}

/// An `iptables-restore --noflush` script that makes `current` into
/// `desired` in one transaction, or `None` when nothing differs. Jumps that
/// are not exactly the wanted ones (an older format, other ports, a
/// duplicate) are deleted; missing ones are inserted first in their chain.
pub fn plan(current: &Current, desired: &Desired) -> Option<String> {
    let wanted = desired.jumps();
    let mut kept = Vec::new();
    let mut stale = Vec::new();
    for j in &current.jumps {
        if wanted.contains(j) && !kept.contains(j) {
            kept.push(j.clone());
        } else {
            stale.push(j);
        }
    }
    let missing: Vec<(&str, &String)> = JUMP_FROM
        .iter()
        .zip(&wanted)
        .filter(|(_, j)| !kept.contains(j))
        .map(|(from, j)| (*from, j))
        .collect();
    let in_sync = current.chain_exists
        && stale.is_empty()
        && missing.is_empty()
        && current.rules == desired.rules;
    if in_sync {
        return None;
    }
    let mut script = String::from("*nat\n");
    // Declaring the chain creates it, or flushes it if it exists: the rules
    // below then replace its whole content atomically.
    script.push_str(&format!(":{CHAIN} - [0:0]\n"));
    for j in stale {
        script.push_str(&delete(j));
        script.push('\n');
    }
    for (from, _) in missing {
        let spec = jump(from, &desired.jump_match);
        let spec = spec.strip_prefix(&format!("-A {from} ")).unwrap_or(&spec);
        script.push_str(&format!("-I {from} 1 {spec}\n"));
    }
    for rule in &desired.rules {
        script.push_str(rule);
        script.push('\n');
    }
    script.push_str("COMMIT\n");
    Some(script)
}

/// A script that removes every jump to our chain (whatever its format)
/// and the chain, or `None` if nothing is there.
pub fn cleanup(current: &Current) -> Option<String> {
    if !current.chain_exists && current.jumps.is_empty() {
        return None;
    }
    let mut script = String::from("*nat\n");
    for j in &current.jumps {
        script.push_str(&delete(j));
        script.push('\n');
    }
    if current.chain_exists {
        script.push_str(&format!("-F {CHAIN}\n-X {CHAIN}\n"));
    }
    script.push_str("COMMIT\n");
    Some(script)
}

/// Which conntrack entries of a destination disagree with the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StaleKind {
    /// Entries NATed to this (old) target by a rule that is gone: they
    /// would keep steering the flow, and its retries, to the old target.
    NatedTo(IpAddr),
    /// Entries that were not NATed (reply source = original destination):
    /// a SYN retried before the rule existed would keep bypassing it.
    NotNated,
}

/// A set of conntrack entries that no longer agree with the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stale {
    /// Original destination: an address (`/32`, `/128`) or a range.
    pub dst: Prefix,
    pub port: u16,
    pub kind: StaleKind,
}

/// A rule read back from its rendered form.
fn parse_rule(rule: &str) -> Option<Rule> {
    let mut words = rule.split_whitespace();
    let (mut dst, mut port, mut to) = (None, None, None);
    while let Some(w) = words.next() {
        match w {
            "-d" => dst = words.next().and_then(|d| d.parse::<Prefix>().ok()),
            "--dport" => port = words.next().and_then(|p| p.parse().ok()),
            "--to-destination" => to = words.next().and_then(|t| t.parse::<SocketAddr>().ok()),
            _ => {}
        }
    }
    Some(Rule {
        dst: dst?,
        port: port?,
        to: to?,
    })
}

/// Whether `outer` holds every address of `inner`.
fn covers(outer: &Prefix, inner: &Prefix) -> bool {
    outer.len <= inner.len && outer.contains(inner.ip)
}

/// Entries that may route around the rules after a change from `before`
/// to `after`: for a rule that appeared, connections to its destination
/// that were not NATed; for a rule that disappeared (an agent left, a
/// `--dnat-cidr` was removed, the target moved), connections NATed to its
/// old target, unless a rule that remains still sends that destination
/// and port to the same target (an agent address inside a `--dnat-cidr`).
/// Connections the new rules translated are never among them.
pub fn stale_entries(before: &BTreeSet<String>, after: &BTreeSet<String>) -> BTreeSet<Stale> {
    let after_rules: Vec<Rule> = after.iter().filter_map(|r| parse_rule(r)).collect();
    let removed = before
        .difference(after)
        .filter_map(|r| parse_rule(r))
        .filter(|gone| {
            !after_rules
                .iter()
                .any(|r| r.port == gone.port && r.to == gone.to && covers(&r.dst, &gone.dst))
        })
        .map(|gone| Stale {
            dst: gone.dst,
            port: gone.port,
            kind: StaleKind::NatedTo(gone.to.ip()),
        });
    let added = after
        .difference(before)
        .filter_map(|r| parse_rule(r))
        .map(|new| Stale {
            dst: new.dst,
            port: new.port,
            kind: StaleKind::NotNated,
        });
    removed.chain(added).collect()
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
-A PREROUTING -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT
-A OUTPUT -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT
-A OUTPUT -d 10.0.0.0/8 -j RETURN
-A TUNNEL-DNAT -d 198.18.1.2/32 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081
COMMIT
";

    /// The same rules with the jumps of before #13: no match at all.
    const OLD_SAVE: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TUNNEL-DNAT - [0:0]
-A PREROUTING -j TUNNEL-DNAT
-A OUTPUT -j TUNNEL-DNAT
-A TUNNEL-DNAT -d 198.18.1.2/32 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081
COMMIT
";

    fn want(addrs: &[&str], ports: &[u16]) -> Desired {
        desired(
            Family::V4,
            addrs.iter().map(|a| a.parse().unwrap()),
            &[],
            ports,
            to(),
        )
    }

    #[test]
    fn renders_in_iptables_save_form() {
        let rules = desired(
            Family::V4,
            ["198.18.1.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            &["10.20.0.0/16".parse().unwrap()],
            &[10250, 9100],
            to(),
        );
        let v: Vec<_> = rules.rules.iter().cloned().collect();
        assert_eq!(
            v,
            [
                "-A TUNNEL-DNAT -d 10.20.0.0/16 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081",
                "-A TUNNEL-DNAT -d 10.20.0.0/16 -p tcp -m tcp --dport 9100 -j DNAT --to-destination 198.18.0.1:8081",
                "-A TUNNEL-DNAT -d 198.18.1.2/32 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081",
                "-A TUNNEL-DNAT -d 198.18.1.2/32 -p tcp -m tcp --dport 9100 -j DNAT --to-destination 198.18.0.1:8081",
            ]
        );
        assert_eq!(
            rules.jumps(),
            [
                "-A OUTPUT -p tcp -m multiport --dports 9100,10250 -j TUNNEL-DNAT",
                "-A PREROUTING -p tcp -m multiport --dports 9100,10250 -j TUNNEL-DNAT",
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
            v6.rules.into_iter().next().unwrap(),
            "-A TUNNEL-DNAT -d fd00::2/128 -p tcp -m tcp --dport 10250 -j DNAT --to-destination [fd00::1]:8081"
        );
    }

    #[test]
    fn the_jump_matches_only_the_redirected_ports() {
        assert_eq!(
            jump_match(&[10255, 10250, 10250]),
            "-p tcp -m multiport --dports 10250,10255"
        );
        let fifteen: Vec<u16> = (1..=15).collect();
        assert!(jump_match(&fifteen).contains("--dports 1,2,3"));
        // multiport takes at most 15 ports; past that, TCP only.
        let sixteen: Vec<u16> = (1..=16).collect();
        assert_eq!(jump_match(&sixteen), "-p tcp");
    }

    #[test]
    fn parses_only_the_nat_table() {
        let c = parse_save(SAVE);
        assert!(c.chain_exists);
        assert_eq!(
            c.jumps,
            [
                "-A PREROUTING -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT",
                "-A OUTPUT -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT",
            ]
        );
        assert_eq!(c.rules.len(), 1);
    }

    #[test]
    fn in_sync_means_no_change() {
        let c = parse_save(SAVE);
        assert_eq!(plan(&c, &want(&["198.18.1.2"], &[10250])), None);
    }

    #[test]
    fn plans_a_full_replacement_with_missing_jumps() {
        let want = want(&["198.18.1.3"], &[10250]);
        let script = plan(&Current::default(), &want).unwrap();
        assert_eq!(
            script,
            "*nat\n:TUNNEL-DNAT - [0:0]\n\
             -I OUTPUT 1 -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT\n\
             -I PREROUTING 1 -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT\n\
             -A TUNNEL-DNAT -d 198.18.1.3/32 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081\nCOMMIT\n"
        );
        // Jumps already there are not added twice.
        let c = parse_save(SAVE);
        let script = plan(&c, &want).unwrap();
        assert!(!script.contains("-I OUTPUT"), "{script}");
        assert!(!script.contains("-D "), "{script}");
    }

    #[test]
    fn old_format_jumps_are_replaced() {
        let c = parse_save(OLD_SAVE);
        assert_eq!(
            c.jumps,
            ["-A PREROUTING -j TUNNEL-DNAT", "-A OUTPUT -j TUNNEL-DNAT"]
        );
        // Same rules, but the jumps carry no match: not in sync.
        let script = plan(&c, &want(&["198.18.1.2"], &[10250])).unwrap();
        assert_eq!(
            script,
            "*nat\n:TUNNEL-DNAT - [0:0]\n\
             -D PREROUTING -j TUNNEL-DNAT\n\
             -D OUTPUT -j TUNNEL-DNAT\n\
             -I OUTPUT 1 -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT\n\
             -I PREROUTING 1 -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT\n\
             -A TUNNEL-DNAT -d 198.18.1.2/32 -p tcp -m tcp --dport 10250 -j DNAT --to-destination 198.18.0.1:8081\nCOMMIT\n"
        );
        // Other ports (--dnat-ports changed) replace the jumps too, and a
        // duplicate of the wanted jump goes.
        let c = parse_save(SAVE);
        let script = plan(&c, &want(&["198.18.1.2"], &[10250, 10255])).unwrap();
        assert!(
            script.contains("-D OUTPUT -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT\n"),
            "{script}"
        );
        assert!(
            script
                .contains("-I OUTPUT 1 -p tcp -m multiport --dports 10250,10255 -j TUNNEL-DNAT\n"),
            "{script}"
        );
        let mut dup = parse_save(SAVE);
        dup.jumps
            .push("-A OUTPUT -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT".into());
        let script = plan(&dup, &want(&["198.18.1.2"], &[10250])).unwrap();
        assert_eq!(script.matches("-D OUTPUT").count(), 1, "{script}");
        assert!(!script.contains("-I "), "{script}");
    }

    #[test]
    fn cleanup_removes_what_exists_only() {
        assert_eq!(cleanup(&Current::default()), None);
        let script = cleanup(&parse_save(SAVE)).unwrap();
        assert_eq!(
            script,
            "*nat\n\
             -D PREROUTING -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT\n\
             -D OUTPUT -p tcp -m multiport --dports 10250 -j TUNNEL-DNAT\n\
             -F TUNNEL-DNAT\n-X TUNNEL-DNAT\nCOMMIT\n"
        );
        // Old-format jumps are removed as well.
        let script = cleanup(&parse_save(OLD_SAVE)).unwrap();
        assert!(
            script.starts_with("*nat\n-D PREROUTING -j TUNNEL-DNAT\n-D OUTPUT -j TUNNEL-DNAT\n"),
            "{script}"
        );
    }

    fn stale(dst: &str, port: u16, kind: StaleKind) -> Stale {
        Stale {
            dst: dst.parse().unwrap(),
            port,
            kind,
        }
    }

    #[test]
    fn stale_entries_are_the_difference() {
        let a = want(&["198.18.1.2"], &[10250]).rules;
        let b = want(&["198.18.1.3"], &[10250]).rules;
        let changed: Vec<_> = stale_entries(&a, &b).into_iter().collect();
        let server = StaleKind::NatedTo("198.18.0.1".parse().unwrap());
        assert_eq!(
            changed,
            [
                // Gone: connections NATed to the server are stale.
                stale("198.18.1.2/32", 10250, server),
                // New: only connections that bypassed NAT are stale; new
                // connections through the rule (reply source 198.18.0.1)
                // must survive the flush.
                stale("198.18.1.3/32", 10250, StaleKind::NotNated),
            ]
        );
        assert!(stale_entries(&a, &a).is_empty());
    }

    #[test]
    fn a_removed_range_is_stale_as_a_range() {
        let with = desired(
            Family::V4,
            [],
            &["10.20.0.0/16".parse().unwrap()],
            &[10250],
            to(),
        )
        .rules;
        let without = BTreeSet::new();
        let server = StaleKind::NatedTo("198.18.0.1".parse().unwrap());
        assert_eq!(
            stale_entries(&with, &without)
                .into_iter()
                .collect::<Vec<_>>(),
            [stale("10.20.0.0/16", 10250, server)]
        );
    }

    #[test]
    fn a_destination_still_redirected_to_the_same_target_is_not_stale() {
        let cidr: Prefix = "198.18.1.0/24".parse().unwrap();
        let agent_and_range = desired(
            Family::V4,
            ["198.18.1.2".parse().unwrap()],
            &[cidr],
            &[10250],
            to(),
        )
        .rules;
        let range_only = desired(Family::V4, [], &[cidr], &[10250], to()).rules;
        // The agent left, but its address is inside the range, whose rule
        // sends it to the same place: nothing to flush.
        assert!(stale_entries(&agent_and_range, &range_only).is_empty());
        // A new target is a change, though.
        let moved = desired(
            Family::V4,
            [],
            &[cidr],
            &[10250],
            "198.18.0.1:9999".parse().unwrap(),
        )
        .rules;
        let changed = stale_entries(&agent_and_range, &moved);
        assert!(changed.contains(&stale(
            "198.18.1.2/32",
            10250,
            StaleKind::NatedTo("198.18.0.1".parse().unwrap())
        )));
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
