//! The server replicas this agent holds a registered connection to, keyed
//! by the address it dialed and the slot on that address (several slots
//! dial one load-balanced address until the agent holds every replica).
//! One replica reachable through two keys is held once (by its server id).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::selector::Transport;

/// Where a replica loop dials: an address, and which of the connections
/// to that address it is (0 unless the address is shared, see
/// [`crate::supervisor`]).
pub type SlotKey = (SocketAddr, u16);

/// One held replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldReplica {
    pub addr: SocketAddr,
    pub slot: u16,
    pub server_id: String,
    pub transport: Transport,
    /// How many replicas it said exist (`Welcome`; 0 unknown).
    pub expected: u16,
}

/// The replicas held now; cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct HeldReplicas(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// Slot → (the hold's serial, the replica).
    map: Mutex<HashMap<SlotKey, (u64, HeldReplica)>>,
    serial: AtomicU64,
}

impl HeldReplicas {
    fn map(&self) -> MutexGuard<'_, HashMap<SlotKey, (u64, HeldReplica)>> {
        // Nothing panics while holding the lock; recover the data if so.
        self.0.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a registered replica. `None` when another slot already
    /// holds the same server id: the caller closes its connection.
    pub fn hold(
        &self,
        key: SlotKey,
        server_id: &str,
        transport: Transport,
        expected: u16,
    ) -> Option<HeldGuard> {
        let mut map = self.map();
        if map
            .iter()
            .any(|(k, (_, r))| *k != key && r.server_id == server_id)
        {
            return None;
        }
        let serial = self.0.serial.fetch_add(1, Ordering::Relaxed);
        let replica = HeldReplica {
            addr: key.0,
            slot: key.1,
            server_id: server_id.to_owned(),
            transport,
            expected,
        };
        map.insert(key, (serial, replica));
        Some(HeldGuard {
            held: self.clone(),
            key,
            serial,
        })
    }

    /// The most replicas any held server says exist (0: none says).
    pub fn expected(&self) -> u16 {
        self.map()
            .values()
            .map(|(_, r)| r.expected)
            .max()
            .unwrap_or(0)
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
    key: SlotKey,
    serial: u64,
}

impl HeldGuard {
    /// The server of this hold says how many replicas exist now
    /// (`Replicas`).
    pub fn set_expected(&self, expected: u16) {
        let mut map = self.held.map();
        if let Some((serial, replica)) = map.get_mut(&self.key) {
            if *serial == self.serial {
                replica.expected = expected;
            }
        }
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        let mut map = self.held.map();
        if map.get(&self.key).is_some_and(|(s, _)| *s == self.serial) {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SlotKey {
        (SocketAddr::from(([127, 0, 0, 1], port)), 0)
    }

    #[test]
    fn a_server_can_change_the_count_it_said() {
        let held = HeldReplicas::default();
        let a = held.hold(addr(1), "replica-a", Transport::Quic, 3).unwrap();
        let b = held.hold(addr(2), "replica-b", Transport::Quic, 3).unwrap();
        assert_eq!(held.expected(), 3);
        // Scaled down: both say 2.
        a.set_expected(2);
        assert_eq!(held.expected(), 3, "the most any held server says");
        b.set_expected(2);
        assert_eq!(held.expected(), 2);
        // A guard whose slot was taken over does not touch the new hold.
        drop(a);
        let a2 = held.hold(addr(1), "replica-c", Transport::Quic, 2).unwrap();
        assert_eq!(held.expected(), 2);
        a2.set_expected(4);
        assert_eq!(held.expected(), 4);
    }

    #[test]
    fn one_replica_through_two_addresses_is_held_once() {
        let held = HeldReplicas::default();
        let a = held.hold(addr(1), "replica-a", Transport::Quic, 0).unwrap();
        assert!(held.hold(addr(2), "replica-a", Transport::H2, 0).is_none());
        let b = held.hold(addr(2), "replica-b", Transport::H2, 0).unwrap();
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
        let old = held.hold(addr(1), "replica-a", Transport::H2, 0).unwrap();
        let new = held.hold(addr(1), "replica-a", Transport::Quic, 0).unwrap();
        drop(old);
        assert_eq!(held.count(Transport::Quic), 1);
        drop(new);
        assert!(held.is_empty());
    }

    #[test]
    fn slots_of_one_address_hold_distinct_replicas() {
        let lb = SocketAddr::from(([198, 18, 0, 10], 8443));
        let held = HeldReplicas::default();
        let a = held.hold((lb, 0), "replica-a", Transport::Quic, 3).unwrap();
        // The load balancer sent slot 1 to the same replica: refused.
        assert!(held
            .hold((lb, 1), "replica-a", Transport::Quic, 3)
            .is_none());
        let _b = held.hold((lb, 1), "replica-b", Transport::Quic, 3).unwrap();
        let _c = held.hold((lb, 2), "replica-c", Transport::Quic, 2).unwrap();
        assert_eq!(held.len(), 3);
        assert_eq!(held.expected(), 3);
        drop(a);
        assert_eq!(held.len(), 2);
    }
}
