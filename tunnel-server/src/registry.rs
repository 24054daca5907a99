//! The agent registry: node name → live agent, address → node.
//!
//! Entries are keyed by node; each carries a connection id so that the
//! cleanup of a replaced connection never removes its replacement.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
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
    /// Lends receive window to this connection's stalled streams.
    pub stall: transport::stall::StallCredit,
    pub streams_active: AtomicI64,
    pub draining: AtomicBool,
    /// Asks the task serving this connection to send `GoAway` and close it.
    pub kick: tokio::sync::Notify,
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
    by_addr: DashMap<IpAddr, String>,
    /// Bumped on every registration and removal (the DNAT helper follows it).
    changes: watch::Sender<u64>,
}

impl Default for AgentRegistry {
    fn default() -> Self {
        AgentRegistry {
            by_node: DashMap::new(),
            by_addr: DashMap::new(),
            changes: watch::Sender::new(0),
        }
    }
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

    /// Registers `agent`, returning the connection it replaced, if any.
    /// The caller closes the replaced connection.
    pub fn register(&self, agent: Arc<AgentHandle>) -> Option<Arc<AgentHandle>> {
        let old = self.by_node.insert(agent.node.clone(), agent.clone());
        if let Some(old) = &old {
            for addr in &old.addresses {
                self.by_addr.remove_if(addr, |_, node| *node == old.node);
            }
        }
        for addr in &agent.addresses {
            if let Some(prev) = self.by_addr.insert(*addr, agent.node.clone()) {
                if prev != agent.node {
                    tracing::warn!(%addr, new = %agent.node, old = %prev,
                        "address moved to another node's certificate");
                }
            }
        }
        self.changes.send_modify(|v| *v += 1);
        old
    }

    /// Removes `agent` if it is still the registered connection of its node.
    /// Returns whether it was.
    pub fn deregister(&self, agent: &AgentHandle) -> bool {
        let removed = self
            .by_node
            .remove_if(&agent.node, |_, cur| cur.id == agent.id)
            .is_some();
        if removed {
            for addr in &agent.addresses {
                self.by_addr.remove_if(addr, |_, node| *node == agent.node);
            }
            self.changes.send_modify(|v| *v += 1);
        }
        removed
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
