//! The server replicas this agent holds a registered connection to, keyed
//! by the address it dialed. One replica reachable through two addresses
//! is held once (by its server id).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::selector::Transport;

/// One held replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldReplica {
    pub addr: SocketAddr,
    pub server_id: String,
    pub transport: Transport,
}

/// The replicas held now; cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct HeldReplicas(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// Address → (the hold's serial, the replica).
    map: Mutex<HashMap<SocketAddr, (u64, HeldReplica)>>,
    serial: AtomicU64,
}

impl HeldReplicas {
    fn map(&self) -> MutexGuard<'_, HashMap<SocketAddr, (u64, HeldReplica)>> {
        // Nothing panics while holding the lock; recover the data if so.
        self.0.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a registered replica. `None` when another address already
    /// holds the same server id: the caller closes its connection.
    pub fn hold(
        &self,
        addr: SocketAddr,
        server_id: &str,
        transport: Transport,
    ) -> Option<HeldGuard> {
        let mut map = self.map();
        if map
            .values()
            .any(|(_, r)| r.addr != addr && r.server_id == server_id)
        {
            return None;
        }
        let serial = self.0.serial.fetch_add(1, Ordering::Relaxed);
        let replica = HeldReplica {
            addr,
            server_id: server_id.to_owned(),
            transport,
        };
        map.insert(addr, (serial, replica));
        Some(HeldGuard {
            held: self.clone(),
            addr,
            serial,
        })
    }

    /// Every held replica, sorted by server id.
    pub fn list(&self) -> Vec<HeldReplica> {
        let mut list: Vec<HeldReplica> = self.map().values().map(|(_, r)| r.clone()).collect();
        list.sort_by(|a, b| a.server_id.cmp(&b.server_id));
        list
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many replicas are held over `transport`.
    pub fn count(&self, transport: Transport) -> usize {
        self.map()
            .values()
            .filter(|(_, r)| r.transport == transport)
            .count()
    }
}

/// Forgets a replica when its session ends, however it ends (unless a
/// newer session on the same address holds it by then).
#[derive(Debug)]
pub struct HeldGuard {
    held: HeldReplicas,
    addr: SocketAddr,
    serial: u64,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        let mut map = self.held.map();
        if map.get(&self.addr).is_some_and(|(s, _)| *s == self.serial) {
            map.remove(&self.addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn one_replica_through_two_addresses_is_held_once() {
        let held = HeldReplicas::default();
        let a = held.hold(addr(1), "replica-a", Transport::Quic).unwrap();
        assert!(held.hold(addr(2), "replica-a", Transport::H2).is_none());
        let b = held.hold(addr(2), "replica-b", Transport::H2).unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(held.count(Transport::Quic), 1);
        assert_eq!(held.count(Transport::H2), 1);
        let ids: Vec<_> = held.list().into_iter().map(|r| r.server_id).collect();
        assert_eq!(ids, ["replica-a", "replica-b"]);
        drop(a);
        drop(b);
        assert!(held.is_empty());
    }

    #[test]
    fn the_same_address_may_register_again() {
        let held = HeldReplicas::default();
        // A transport switch: the old session ends after the new one holds.
        let old = held.hold(addr(1), "replica-a", Transport::H2).unwrap();
        let new = held.hold(addr(1), "replica-a", Transport::Quic).unwrap();
        drop(old);
        assert_eq!(held.count(Transport::Quic), 1);
        drop(new);
        assert!(held.is_empty());
    }
}
