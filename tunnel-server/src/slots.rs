//! The cap on client connections: CONNECT and transparent ingress share
//! one pool of slots, sized from the open-files limit (each client
//! connection holds one descriptor; QUIC agents hold none, HTTP/2 agents
//! one each, kept in the reserve). When every slot is taken the ingresses
//! stop accepting: new connections wait in the kernel's listen backlog
//! instead of failing with EMFILE, and the admin listener and the agents
//! keep their descriptors.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Client connection slots.
#[derive(Debug)]
pub struct ClientSlots {
    sem: Arc<Semaphore>,
    limit: usize,
}

impl ClientSlots {
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        ClientSlots {
            sem: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        self.limit - self.sem.available_permits()
    }

    /// A slot for the next client connection; waits while none is free
    /// (counted, and logged at growing intervals: 1st, 2nd, 4th, 8th ...).
    pub async fn acquire(&self, metrics: &Metrics) -> OwnedSemaphorePermit {
        if let Ok(slot) = self.sem.clone().try_acquire_owned() {
            return slot;
        }
        let hits = metrics.client_limit_hits.inc() + 1;
        if hits.is_power_of_two() {
            tracing::warn!(
                limit = self.limit,
                hits,
                "every client connection slot is taken; new clients wait in the listen backlog (--max-client-connections)"
            );
        }
        self.sem
            .clone()
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_pool_waits_and_counts() {
        let metrics = Metrics::new();
        let slots = ClientSlots::new(2);
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
}
