//! Keeping the DNAT rules in line with the agents, and removing them.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::sync::watch;

use super::conntrack::Conntrack;
use super::iptables::{has_net_admin, DnatError, Iptables};
use super::metrics::DnatMetrics;
use super::rules::{self, Family, Prefix};
use crate::addresses::{forbidden_kind, own_addresses, AddressPolicy};

/// What the helper redirects, and where.
#[derive(Clone, Debug)]
pub struct DnatConfig {
    /// The transparent ingress the rules point at.
    pub to: SocketAddr,
    /// Ports redirected on every edge address. Default 10250, 10255.
    pub ports: Vec<u16>,
    /// Static edge ranges redirected whether or not an agent is connected.
    pub cidrs: Vec<Prefix>,
    /// Re-check (and repair drift) at least this often. Default 30 s.
    pub resync: Duration,
    /// Which agent addresses may be redirected (loopback never is). An
    /// address from a certificate or from the standalone helper's feed
    /// that fails it gets no rule.
    pub policy: AddressPolicy,
}

impl DnatConfig {
    pub fn try_new(
        to: SocketAddr,
        mut ports: Vec<u16>,
        cidrs: Vec<Prefix>,
    ) -> Result<DnatConfig, String> {
        if to.ip().is_unspecified() || to.port() == 0 {
            return Err(format!(
                "DNAT target {to} is not a concrete address: pass --dnat-to with the transparent listener's address"
            ));
        }
        if ports.is_empty() || ports.contains(&0) {
            return Err("--dnat-ports needs at least one port in 1-65535".into());
        }
        ports.sort_unstable();
        ports.dedup();
        let family = Family::of(to.ip());
        if let Some(c) = cidrs.iter().find(|c| c.family() != family) {
            return Err(format!(
                "--dnat-cidr {c} is not of the same address family as the DNAT target {to}"
            ));
        }
        if let Some((c, why)) = cidrs
            .iter()
            .find_map(|c| forbidden_kind(c.ip).map(|why| (c, why)))
        {
            return Err(format!(
                "--dnat-cidr {c} is {why}: it must never be redirected"
            ));
        }
        // Not only its first address: a range that covers any of them
        // (64.0.0.0/2 holds 127/8) would redirect them too.
        for c in &cidrs {
            if let Some(range) = NEVER_REDIRECTED
                .iter()
                .map(|r| r.parse::<Prefix>().expect("a valid constant"))
                .find(|r| overlaps(c, r))
            {
                let why = forbidden_kind(range.ip).map_or_else(String::new, |w| format!(" ({w})"));
                return Err(format!(
                    "--dnat-cidr {c} covers {range}{why}: it must never be redirected"
                ));
            }
            if let Some(own) = own_addresses().into_iter().find(|a| c.contains(*a)) {
                return Err(format!(
                    "--dnat-cidr {c} covers {own}, an address of this host: its own traffic \
                     (the apiserver's, the kubelet's) would be redirected into the tunnel; \
                     list the edge ranges only"
                ));
            }
        }
        Ok(DnatConfig {
            to,
            ports,
            cidrs,
            resync: Duration::from_secs(30),
            policy: AddressPolicy::default(),
        })
    }
}

/// Ranges no `--dnat-cidr` may reach into: loopback, unspecified,
/// link-local, multicast and broadcast.
const NEVER_REDIRECTED: [&str; 9] = [
    "127.0.0.0/8",
    "0.0.0.0/32",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::1/128",
    "::/128",
    "fe80::/10",
    "ff00::/8",
];

/// Whether two prefixes share an address.
fn overlaps(a: &Prefix, b: &Prefix) -> bool {
    a.family() == b.family()
        && ((a.len <= b.len && a.contains(b.ip)) || (b.len <= a.len && b.contains(a.ip)))
}

/// The helper: its configuration and the iptables tools it drives.
pub struct Dnat {
    config: DnatConfig,
    iptables: Iptables,
    conntrack: Conntrack,
    metrics: DnatMetrics,
}

impl Dnat {
    /// Checks the capability and finds iptables; fails with a clear
    /// message. Counts into `metrics`.
    pub async fn start(config: DnatConfig, metrics: DnatMetrics) -> Result<Dnat, DnatError> {
        if !has_net_admin() {
            return Err(DnatError::MissingCapability);
        }
        let iptables = Iptables::detect(Family::of(config.to.ip())).await?;
        Ok(Dnat {
            config,
            iptables,
            conntrack: Conntrack::new(metrics.clone()),
            metrics,
        })
    }

    /// Makes the chain hold exactly the rules for `addresses`, and the
    /// jumps into it match exactly the redirected ports; returns whether
    /// anything had to change. Rules of ours that are no longer wanted
    /// (including those a previous run left, e.g. a `--dnat-cidr` dropped
    /// across a restart) have their conntrack entries flushed.
    pub async fn sync(&self, addresses: &[IpAddr]) -> Result<bool, DnatError> {
        let result = self.sync_inner(addresses).await;
        self.metrics.sync(match result {
            Ok(true) => "changed",
            Ok(false) => "unchanged",
            Err(_) => "failed",
        });
        result
    }

    async fn sync_inner(&self, addresses: &[IpAddr]) -> Result<bool, DnatError> {
        let c = &self.config;
        let own = own_addresses();
        let mut policy = c.policy.clone();
        policy.allow_loopback = false;
        let addresses = addresses
            .iter()
            .copied()
            .filter(|&a| match policy.check(a, &own) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(address = %a, "not redirecting {a}: it is {why}");
                    false
                }
            });
        let want = rules::desired(self.iptables.family, addresses, &c.cidrs, &c.ports, c.to);
        let current = self.iptables.current().await?;
        let Some(script) = rules::plan(&current, &want) else {
            return Ok(false);
        };
        self.iptables.apply(&script).await?;
        for stale in rules::stale_entries(&current.rules, &want.rules) {
            self.conntrack.flush(&stale).await;
        }
        tracing::info!(rules = want.rules.len(), jump = %want.jump_match, "DNAT rules applied");
        Ok(true)
    }

    /// Removes the jumps and the chain.
    pub async fn cleanup(&self) -> Result<(), DnatError> {
        let current = self.iptables.current().await?;
        if let Some(script) = rules::cleanup(&current) {
            self.iptables.apply(&script).await?;
            for stale in rules::stale_entries(&current.rules, &BTreeSet::new()) {
                self.conntrack.flush(&stale).await;
            }
            tracing::info!("DNAT rules removed");
        }
        Ok(())
    }

    pub fn config(&self) -> &DnatConfig {
        &self.config
    }
}

/// Syncs on every change signalled by `changes` and every `resync`, until
/// `shutdown`; then removes the rules. A failed read of the addresses keeps
/// the rules as they are (a restarting server must not blackhole nodes).
///
/// `changes`: `None` where nothing signals (the standalone helper, which
/// polls the feed every `--poll`).
pub async fn run<F, Fut>(
    dnat: Dnat,
    mut changes: Option<watch::Receiver<u64>>,
    mut addresses: F,
    shutdown: impl Future<Output = ()>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Vec<IpAddr>, DnatError>>,
{
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(dnat.config.resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match addresses().await {
            Ok(addrs) => {
                if let Err(e) = dnat.sync(&addrs).await {
                    tracing::error!("DNAT sync failed: {e}");
                }
            }
            Err(e) => tracing::warn!("keeping the current DNAT rules: {e}"),
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
            () = changed(&mut changes) => {}
        }
    }
    if let Err(e) = dnat.cleanup().await {
        tracing::error!("removing the DNAT rules failed: {e}; run `tunnel-server dnat --cleanup`");
    }
}

/// Completes on the next change `changes` signals; never, once there is
/// no sender (or never was one): only the periodic resync is left then. A
/// closed receiver completes at once, every time, so it must not be
/// waited on again (the standalone helper once re-read the feed and
/// re-ran `iptables-save` in a tight loop that way).
async fn changed(changes: &mut Option<watch::Receiver<u64>>) {
    let Some(rx) = changes.as_mut() else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        *changes = None;
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A closed change signal leaves only the resync: waiting on it again
    /// never completes (the standalone helper passes `None`).
    #[tokio::test(start_paused = true)]
    async fn a_closed_change_signal_is_not_a_change() {
        let wait = Duration::from_secs(3600);
        let (tx, rx) = watch::channel(0u64);
        let mut changes = Some(rx);
        tx.send(1).unwrap();
        tokio::time::timeout(wait, changed(&mut changes))
            .await
            .expect("a change is one");
        drop(tx);
        for _ in 0..3 {
            assert!(
                tokio::time::timeout(wait, changed(&mut changes))
                    .await
                    .is_err(),
                "a closed signal completed a wait"
            );
        }
        assert!(changes.is_none());
        let mut none = None;
        assert!(tokio::time::timeout(wait, changed(&mut none))
            .await
            .is_err());
    }

    #[test]
    fn config_is_validated() {
        let to: SocketAddr = "198.18.0.1:8081".parse().unwrap();
        assert!(DnatConfig::try_new(to, vec![10250], vec![]).is_ok());
        assert!(
            DnatConfig::try_new("0.0.0.0:8081".parse().unwrap(), vec![10250], vec![])
                .unwrap_err()
                .contains("--dnat-to")
        );
        assert!(DnatConfig::try_new(to, vec![], vec![]).is_err());
        assert!(
            DnatConfig::try_new(to, vec![10250], vec!["fd00::/64".parse().unwrap()])
                .unwrap_err()
                .contains("family")
        );
        for forbidden in [
            "127.0.0.0/8",
            "169.254.0.0/16",
            "0.0.0.0/0",
            "64.0.0.0/2",
            "128.0.0.0/1",
            "127.1.0.0/16",
        ] {
            let err =
                DnatConfig::try_new(to, vec![10250], vec![forbidden.parse().unwrap()]).unwrap_err();
            assert!(
                err.contains("must never be redirected"),
                "{forbidden}: {err}"
            );
        }
        let v6: SocketAddr = "[fd00::1]:8081".parse().unwrap();
        for forbidden in ["8000::/1", "::/0", "fe80::/64"] {
            let err =
                DnatConfig::try_new(v6, vec![10250], vec![forbidden.parse().unwrap()]).unwrap_err();
            assert!(
                err.contains("must never be redirected"),
                "{forbidden}: {err}"
            );
        }
        assert!(DnatConfig::try_new(v6, vec![10250], vec!["fd00:1::/64".parse().unwrap()]).is_ok());
        // A range holding one of this host's own addresses.
        if let Some(own) = own_addresses()
            .into_iter()
            .find(|a| a.is_ipv4() && forbidden_kind(*a).is_none())
        {
            let err = DnatConfig::try_new(to, vec![10250], vec![Prefix::host(own)]).unwrap_err();
            assert!(err.contains("an address of this host"), "{err}");
        }
        assert!(
            DnatConfig::try_new(to, vec![10250], vec!["198.19.0.0/16".parse().unwrap()]).is_ok()
        );
    }
}
