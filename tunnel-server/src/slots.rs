//! The cap on client connections: CONNECT and transparent ingress share
//! one pool of slots, sized from the open-files limit (each client
//! connection holds one descriptor; QUIC agents hold none, HTTP/2 agents
//! one each, kept in the reserve). When every slot is taken the ingresses
//! stop accepting: new connections wait in the kernel's listen backlog
//! instead of failing with EMFILE, and the admin listener and the agents
//! keep their descriptors.
//!
//! Within the pool, one client (an IPv4 address or an IPv6 /64) may hold
//! at most `--max-streams-per-client` connections on each ingress
//! ([`ClientSlots::claim`]): past it a connection is refused at once rather
//! than queued, so one client cannot fill the pool, or a node's streams,
//! for the others. The ingresses count apart, so a process flooding the
//! CONNECT port cannot lock its host's transparent path (kube-apiserver's
//! route to kubelets) out, nor the other way round.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

use tokio::sync::OwnedSemaphorePermit;
use transport::net::ConnectionSlots;

use crate::metrics::Metrics;

/// Client connection slots.
#[derive(Debug)]
pub struct ClientSlots {
    slots: ConnectionSlots,
    per_client: usize,
    /// Connections open per client; an entry lives while its count is
    /// above zero, so the map is bounded by the pool.
    clients: Arc<DashMap<(&'static str, IpAddr), usize>>,
}

/// One client's connection counted against `--max-streams-per-client`;
/// given back when dropped.
#[derive(Debug)]
pub struct ClientClaim {
    clients: Arc<DashMap<(&'static str, IpAddr), usize>>,
    key: (&'static str, IpAddr),
}

impl Drop for ClientClaim {
    fn drop(&mut self) {
        self.clients.remove_if_mut(&self.key, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// A client over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("client {client} has {limit} tunneled connections open through the {ingress} ingress, its limit (--max-streams-per-client)")]
pub struct ClientBusy {
    pub client: IpAddr,
    pub ingress: &'static str,
    pub limit: usize,
}

impl ClientSlots {
    pub fn new(limit: usize, per_client: usize) -> Self {
        ClientSlots {
            slots: ConnectionSlots::new(limit),
            per_client: per_client.max(1),
            clients: Arc::default(),
        }
    }

    /// Counts a connection from `client` on `ingress` if it has fewer
    /// than the per-client limit open there.
    pub fn claim(&self, client: IpAddr, ingress: &'static str) -> Result<ClientClaim, ClientBusy> {
        let key = (ingress, transport::window::client_key(client));
        let mut n = self.clients.entry(key).or_insert(0);
        if *n >= self.per_client {
            return Err(ClientBusy {
                client: key.1,
                ingress,
                limit: self.per_client,
            });
        }
        *n += 1;
        drop(n);
        Ok(ClientClaim {
            clients: self.clients.clone(),
            key,
        })
    }

    /// Clients with a connection open now (on either ingress).
    pub fn clients(&self) -> usize {
        let mut seen: Vec<IpAddr> = self.clients.iter().map(|e| e.key().1).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    pub fn limit(&self) -> usize {
        self.slots.limit()
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        self.slots.in_use()
    }

    /// A slot for the next client connection; waits while none is free
    /// (counted, and logged at growing intervals: 1st, 2nd, 4th, 8th ...).
    pub async fn acquire(&self, metrics: &Metrics) -> OwnedSemaphorePermit {
        self.slots
            .acquire(|| {
                let hits = metrics.client_limit_hits.inc() + 1;
                self.slots
                    .warn_full(hits, "client connection", "--max-client-connections");
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_pool_waits_and_counts() {
        let metrics = Metrics::new();
        let slots = ClientSlots::new(2, 2);
        let a = slots.acquire(&metrics).await;
        let _b = slots.acquire(&metrics).await;
        assert_eq!(slots.in_use(), 2);
        assert_eq!(metrics.client_limit_hits.get(), 0);
        let waiting = tokio::spawn({
            let slots = Arc::new(slots);
            let metrics = Arc::new(metrics);
            async move {
                let _c = slots.acquire(&metrics).await;
                metrics.client_limit_hits.get()
            }
        });
        tokio::task::yield_now().await;
        drop(a);
        assert_eq!(waiting.await.unwrap(), 1);
    }

    #[test]
    fn one_client_stops_at_its_limit_and_others_do_not() {
        let slots = ClientSlots::new(100, 2);
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let first = slots.claim(a, "connect").unwrap();
        let _second = slots.claim(a, "connect").unwrap();
        assert_eq!(
            slots.claim(a, "connect").unwrap_err(),
            ClientBusy {
                client: a,
                ingress: "connect",
                limit: 2
            }
        );
        // The other ingress counts apart.
        let _transparent = slots.claim(a, "transparent").unwrap();
        let _other = slots.claim(b, "connect").unwrap();
        // The same /64 is one client; an IPv4-mapped address is its IPv4.
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let _v6 = slots.claim(v6, "connect").unwrap();
        let _v6b = slots
            .claim("2001:db8::ffff".parse().unwrap(), "connect")
            .unwrap();
        assert!(slots
            .claim("2001:db8::2".parse().unwrap(), "connect")
            .is_err());
        assert!(slots
            .claim("::ffff:198.18.0.1".parse().unwrap(), "connect")
            .is_err());
        drop(first);
        let _again = slots.claim(a, "connect").unwrap();
        assert_eq!(slots.clients(), 3);
    }

    #[test]
    fn the_map_forgets_clients_with_nothing_open() {
        let slots = ClientSlots::new(100, 8);
        let claims: Vec<_> = (1..=50u8)
            .map(|i| {
                slots
                    .claim(IpAddr::from([198, 18, 1, i]), "connect")
                    .unwrap()
            })
            .collect();
        assert_eq!(slots.clients(), 50);
        drop(claims);
        assert_eq!(slots.clients(), 0);
    }
}
