//! The agent registry: node name → live agent, address → node.
//!
//! Entries are keyed by node; each carries a connection id so that the
//! cleanup of a replaced connection never removes its replacement. An
//! address belongs to one live node at a time: a registration that claims
//! an address another node's live agent serves is refused
//! ([`AddressConflict`]), so the address map is always exactly the union
//! of the live registrations' addresses.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use tokio::sync::watch;

use crate::link::AgentLink;

/// One registered agent connection.
pub struct AgentHandle {
    pub id: u64,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    pub connected_since: SystemTime,
    pub link: AgentLink,
    /// This connection's receive window: its share of the server's
    /// budget, and credit lent to its stalled streams.
    pub window: transport::window::ReceiveWindow,
    pub streams_active: AtomicI64,
    pub draining: AtomicBool,
    /// Asks the task serving this connection to send `GoAway` and close it.
    pub kick: tokio::sync::Notify,
    /// The agent process's random id from `Hello` (0: unknown).
    pub instance: u64,
    /// The instance of the process this one took the node over from
    /// (`SUCCESSOR`), refused while this connection is registered (0:
    /// none).
    pub supersedes: AtomicU64,
    /// That process's connection, left open for its streams: registered
    /// again if this one ends first (the successor crashed, or was rolled
    /// back) while it is still open. Weak: once it ends, nothing keeps its
    /// connection state (a fleet's worth after a rollout).
    pub predecessor: Mutex<Option<std::sync::Weak<AgentHandle>>>,
    /// When its certificate expires (Unix seconds).
    pub not_after: i64,
    /// Its certificate's serial (lowercase hex), for the deny-list.
    pub serial: String,
    /// Its certificate's lineage ([`certs::Identity::lineage`]).
    pub lineage: Option<String>,
}

impl AgentHandle {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// What a lookup found.
pub enum Route {
    Agent(Arc<AgentHandle>),
    /// The node is known but its agent is draining.
    Draining(String),
    /// No live agent serves this node or address.
    NoAgent,
}

pub struct AgentRegistry {
    by_node: DashMap<String, Arc<AgentHandle>>,
    /// Derived from `by_node`: every address of every registered agent.
    /// Live registrations never share an address (see [`Self::register`]),
    /// so each address has exactly one node.
    by_addr: DashMap<IpAddr, String>,
    /// Serializes registrations and removals: the conflict check and the
    /// update of both maps are one step.
    writes: Mutex<()>,
    /// Bumped on every registration and removal (the DNAT helper follows it).
    changes: watch::Sender<u64>,
}

impl Default for AgentRegistry {
    fn default() -> Self {
        AgentRegistry {
            by_node: DashMap::new(),
            by_addr: DashMap::new(),
            writes: Mutex::new(()),
            changes: watch::Sender::new(0),
        }
    }
}

/// A registration refused because another node's live agent serves one of
/// its addresses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "address {address} is served by node {holder}, whose agent is connected; \
     two nodes' certificates carry it"
)]
pub struct AddressConflict {
    pub address: IpAddr,
    /// The node that holds the address.
    pub holder: String,
}

impl AgentRegistry {
    /// Notifies on every registration and removal.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every address of every registered agent.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.by_addr.iter().map(|e| *e.key()).collect()
    }

    /// Registers `agent`, returning the connection of the same node it
    /// replaced, if any (the caller closes it).
    ///
    /// An address is served by one node at a time: while another node's
    /// agent is registered with one of `agent`'s addresses, `agent` is
    /// refused, whole, and nothing changes. First come keeps it: a second
    /// certificate carrying the address must not take its traffic, and
    /// when the holder leaves the newcomer's next attempt succeeds.
    pub fn register(
        &self,
        agent: Arc<AgentHandle>,
    ) -> Result<Option<Arc<AgentHandle>>, AddressConflict> {
        let _writing = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        for addr in &agent.addresses {
            if let Some(holder) = self.by_addr.get(addr) {
                if *holder != agent.node {
                    return Err(AddressConflict {
                        address: *addr,
                        holder: holder.clone(),
                    });
                }
            }
        }
        // The new addresses first, then only those the node no longer
        // has (a renewed certificate may have dropped some): readers of
        // the maps (dials, the DNAT sync's snapshot) take no lock, and an
        // address the node keeps must never be missing in between (a
        // snapshot then would remove its rule and flush its sessions).
        for addr in &agent.addresses {
            self.by_addr.insert(*addr, agent.node.clone());
        }
        let old = self.by_node.insert(agent.node.clone(), agent.clone());
        if let Some(old) = &old {
            for addr in old
                .addresses
                .iter()
                .filter(|a| !agent.addresses.contains(a))
            {
                self.by_addr.remove(addr);
            }
        }
        self.changes.send_modify(|v| *v += 1);
        Ok(old)
    }

    /// Removes `agent` if it is still the registered connection of its
    /// node and, in the same step, registers `back` (an earlier connection
    /// of the same node, still open) in its place, unless another node's
    /// agent holds one of `back`'s addresses now. Returns whether `agent`
    /// was registered, and whether `back` took its place.
    pub fn deregister_to(&self, agent: &AgentHandle, back: Arc<AgentHandle>) -> (bool, bool) {
        let _writing = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let registered = self
            .by_node
            .get(&agent.node)
            .is_some_and(|cur| cur.id == agent.id);
        if !registered {
            return (false, false);
        }
        // Writers hold `writes`: the check above still holds. Addresses
        // `back` keeps are never missing in between (see `register`).
        // `back`'s connection open is checked here, under the lock: its
        // task deregisters it only after it closed, so a `back` that
        // closes later is removed by its own task.
        let free = back.node == agent.node
            && back.link.is_open()
            && back
                .addresses
                .iter()
                .all(|addr| self.by_addr.get(addr).is_none_or(|h| *h == back.node));
        let kept: &[IpAddr] = if free { &back.addresses } else { &[] };
        if free {
            for addr in &back.addresses {
                self.by_addr.insert(*addr, back.node.clone());
            }
            self.by_node.insert(back.node.clone(), back.clone());
        } else {
            self.by_node.remove(&agent.node);
        }
        for addr in agent.addresses.iter().filter(|a| !kept.contains(a)) {
            self.by_addr.remove(addr);
        }
        self.changes.send_modify(|v| *v += 1);
        (true, free)
    }

    /// Removes `agent` if it is still the registered connection of its node.
    /// Returns whether it was.
    pub fn deregister(&self, agent: &AgentHandle) -> bool {
        let _writing = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self
            .by_node
            .remove_if(&agent.node, |_, cur| cur.id == agent.id)
            .is_some();
        if removed {
            // Registrations never share addresses: these were its own.
            for addr in &agent.addresses {
                self.by_addr.remove(addr);
            }
            self.changes.send_modify(|v| *v += 1);
        }
        removed
    }

    /// The registered connection of `node`, draining or not.
    pub fn registered(&self, node: &str) -> Option<Arc<AgentHandle>> {
        self.by_node.get(node).map(|a| a.clone())
    }

    pub fn by_node(&self, node: &str) -> Route {
        match self.by_node.get(node) {
            Some(a) if a.is_draining() => Route::Draining(node.to_owned()),
            Some(a) => Route::Agent(a.clone()),
            None => Route::NoAgent,
        }
    }

    pub fn by_address(&self, addr: IpAddr) -> Route {
        let node = match self.by_addr.get(&addr) {
            Some(n) => n.clone(),
            None => return Route::NoAgent,
        };
        self.by_node(&node)
    }

    /// Every registered agent, for `/v1/agents`.
    pub fn snapshot(&self) -> Vec<Arc<AgentHandle>> {
        let mut v: Vec<_> = self.by_node.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    pub fn len(&self) -> usize {
        self.by_node.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_node.is_empty()
    }
}

/// Agent handles without a network, for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An agent link over an in-memory HTTP/2 connection nobody serves:
    /// enough to register a handle and route to it.
    pub(crate) async fn idle_link() -> AgentLink {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let settings = transport::h2::H2Settings::default();
        let (send, connection) = settings.client().handshake(ours).await.unwrap();
        tokio::spawn(async move {
            let _peer = theirs;
            let _ = connection.await;
        });
        let budget = transport::window::ReceiveBudget::new(transport::window::BudgetLimits::SERVER);
        let (window, _h2) = transport::window::ReceiveWindow::h2(&settings, &budget);
        AgentLink::H2(crate::link::H2Link {
            send,
            remote: "127.0.0.1:1".parse().unwrap(),
            shutdown: Arc::new(tokio::sync::Notify::new()),
            closed: tokio::sync::watch::channel(false).1,
            window,
            chain: Arc::default(),
        })
    }

    /// A handle for connection `id` of `node` with `addresses`.
    pub(crate) async fn handle(id: u64, node: &str, addresses: &[&str]) -> Arc<AgentHandle> {
        let link = idle_link().await;
        let window = match &link {
            AgentLink::H2(h) => h.window.clone(),
            AgentLink::Quic(_) => unreachable!(),
        };
        Arc::new(AgentHandle {
            id,
            node: node.to_owned(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            connected_since: SystemTime::now(),
            link,
            window,
            streams_active: AtomicI64::new(0),
            draining: AtomicBool::new(false),
            kick: tokio::sync::Notify::new(),
            instance: 0,
            supersedes: AtomicU64::new(0),
            predecessor: Mutex::default(),
            not_after: 0,
            serial: String::new(),
            lineage: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::handle;
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A node that registers again (a handover, a renewal) or is handed
    /// back keeps its addresses: a reader that takes no lock (dials, the
    /// DNAT sync's snapshot) never finds one missing in between. They
    /// were removed and inserted again, and a snapshot in the gap removed
    /// the node's DNAT rule and flushed its sessions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_address_the_node_keeps_is_never_missing() {
        let registry = Arc::new(AgentRegistry::default());
        let a = handle(1, "edge-1", &["198.18.1.2"]).await;
        let b = handle(2, "edge-1", &["198.18.1.2"]).await;
        registry.register(a.clone()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = std::thread::spawn({
            let (registry, stop) = (registry.clone(), stop.clone());
            move || {
                let mut missing = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if registry.addresses().is_empty() {
                        missing += 1;
                    }
                }
                missing
            }
        });
        for _ in 0..20_000 {
            registry.register(b.clone()).unwrap();
            assert_eq!(registry.deregister_to(&b, a.clone()), (true, true));
        }
        stop.store(true, Ordering::Relaxed);
        assert_eq!(reader.join().unwrap(), 0, "reads found the address missing");
    }

    fn node_at(registry: &AgentRegistry, addr: &str) -> Option<String> {
        match registry.by_address(ip(addr)) {
            Route::Agent(a) => Some(a.node.clone()),
            Route::Draining(n) => Some(n),
            Route::NoAgent => None,
        }
    }

    /// The address map, checked against a recomputation from the live
    /// registrations.
    fn addresses(registry: &AgentRegistry) -> Vec<(IpAddr, String)> {
        let mut derived: Vec<_> = registry
            .by_addr
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        derived.sort();
        let mut recomputed: Vec<_> = registry
            .snapshot()
            .iter()
            .flat_map(|a| a.addresses.iter().map(|ip| (*ip, a.node.clone())))
            .collect();
        recomputed.sort();
        assert_eq!(derived, recomputed, "address map out of step");
        derived
    }

    #[tokio::test]
    async fn a_live_nodes_address_is_refused_to_another_node() {
        let registry = AgentRegistry::default();
        let rightful = handle(1, "edge-1", &["198.18.0.5", "198.18.0.6"]).await;
        let intruder = handle(2, "edge-2", &["198.18.0.7", "198.18.0.5"]).await;
        registry.register(rightful.clone()).unwrap();
        let changes = *registry.subscribe().borrow();
        let conflict = registry.register(intruder.clone()).err().unwrap();
        assert_eq!(
            conflict,
            AddressConflict {
                address: ip("198.18.0.5"),
                holder: "edge-1".into()
            }
        );
        assert!(conflict
            .to_string()
            .contains("198.18.0.5 is served by node edge-1"));
        // Refused whole: none of its addresses, not even the free one.
        assert_eq!(node_at(&registry, "198.18.0.5").as_deref(), Some("edge-1"));
        assert_eq!(node_at(&registry, "198.18.0.7"), None);
        assert!(matches!(registry.by_node("edge-2"), Route::NoAgent));
        assert_eq!(*registry.subscribe().borrow(), changes, "nothing changed");
        addresses(&registry);

        // The refused agent's cleanup must not touch the holder.
        assert!(!registry.deregister(&intruder));
        assert_eq!(node_at(&registry, "198.18.0.5").as_deref(), Some("edge-1"));
        assert_eq!(addresses(&registry).len(), 2);
    }

    #[tokio::test]
    async fn an_ended_successor_hands_the_node_back_to_its_predecessor() {
        let registry = AgentRegistry::default();
        let old = handle(1, "edge-1", &["198.18.0.5"]).await;
        let new = handle(2, "edge-1", &["198.18.0.6"]).await;
        registry.register(old.clone()).unwrap();
        registry.register(new.clone()).unwrap();
        assert_eq!(registry.deregister_to(&new, old.clone()), (true, true));
        assert_eq!(registry.registered("edge-1").unwrap().id, 1);
        assert_eq!(node_at(&registry, "198.18.0.5").as_deref(), Some("edge-1"));
        assert_eq!(node_at(&registry, "198.18.0.6"), None);
        // Not registered (any more): nothing changes.
        assert_eq!(registry.deregister_to(&new, old.clone()), (false, false));
        assert_eq!(registry.registered("edge-1").unwrap().id, 1);

        // Another node took the old connection's address meanwhile: it
        // keeps it, and the node goes unregistered.
        let new = handle(3, "edge-1", &["198.18.0.6"]).await;
        registry.register(new.clone()).unwrap();
        let other = handle(4, "edge-2", &["198.18.0.5"]).await;
        registry.register(other).unwrap();
        assert_eq!(registry.deregister_to(&new, old), (true, false));
        assert!(registry.registered("edge-1").is_none());
        assert_eq!(node_at(&registry, "198.18.0.5").as_deref(), Some("edge-2"));
        assert_eq!(
            addresses(&registry),
            [(ip("198.18.0.5"), "edge-2".to_owned())]
        );
    }

    #[tokio::test]
    async fn the_address_is_free_once_its_holder_leaves() {
        let registry = AgentRegistry::default();
        let first = handle(1, "edge-1", &["198.18.0.5"]).await;
        let second = handle(2, "edge-2", &["198.18.0.5", "198.18.0.9"]).await;
        registry.register(first.clone()).unwrap();
        assert!(registry.register(second.clone()).is_err());
        // First leaves: the address is unrouted, then the second's next
        // attempt gets it.
        assert!(registry.deregister(&first));
        assert_eq!(node_at(&registry, "198.18.0.5"), None);
        assert!(addresses(&registry).is_empty());
        let second_again = handle(3, "edge-2", &["198.18.0.5", "198.18.0.9"]).await;
        registry.register(second_again.clone()).unwrap();
        assert_eq!(node_at(&registry, "198.18.0.5").as_deref(), Some("edge-2"));
        // Now the first one comes back and is the one refused.
        let first_again = handle(4, "edge-1", &["198.18.0.5"]).await;
        assert_eq!(
            registry.register(first_again).err().unwrap().holder,
            "edge-2"
        );
        // Second leaves: nothing is left behind.
        assert!(registry.deregister(&second_again));
        assert!(addresses(&registry).is_empty());
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn a_node_may_re_register_its_own_addresses() {
        let registry = AgentRegistry::default();
        let old = handle(1, "edge-1", &["198.18.0.5", "198.18.0.6"]).await;
        registry.register(old.clone()).unwrap();
        // A renewed certificate: one address kept, one dropped, one new.
        let new = handle(2, "edge-1", &["198.18.0.5", "198.18.0.8"]).await;
        let replaced = registry.register(new.clone()).unwrap().unwrap();
        assert_eq!(replaced.id, 1);
        assert_eq!(
            addresses(&registry),
            [
                (ip("198.18.0.5"), "edge-1".to_owned()),
                (ip("198.18.0.8"), "edge-1".to_owned())
            ]
        );
        // The replaced connection's cleanup leaves the new one alone.
        assert!(!registry.deregister(&old));
        assert_eq!(addresses(&registry).len(), 2);
        // The dropped address is free for another node.
        registry
            .register(handle(3, "edge-2", &["198.18.0.6"]).await)
            .unwrap();
        assert_eq!(node_at(&registry, "198.18.0.6").as_deref(), Some("edge-2"));
        addresses(&registry);
    }
}
