//! Connection credit lent to stalled streams.
//!
//! Both transports have two levels of flow control: each stream may have a
//! stream window of data unread, all streams of a connection together the
//! connection window. Data a stream's reader has not taken still counts
//! against the connection, so a few streams whose TCP client stopped
//! reading (a `kubectl logs` to a stuck terminal) would use up the
//! connection's credit and stall every other stream, new ones included:
//! head-of-line blocking by flow control, with 16 such streams over QUIC
//! and 32 over HTTP/2 at the default windows.
//!
//! The relay reports a stream as stalled when one of its TCP writes has
//! been blocked for [`crate::relay::STALL_AFTER`]. [`StallCredit`] then
//! widens the connection's receive window by one stream window (the most
//! that stream can hold) until the stream ends, so the other streams keep
//! the whole base window. A stream is lent once: returning the credit
//! whenever a write goes through would move the window up and down with
//! every chunk of a slow reader, and QUIC (quinn) grants a raise at once
//! but takes a cut back only as data is read, so the window would creep.
//! What one process lends is capped by its [`StallBudget`], and what one
//! connection borrows by a quarter of it; past either, stalled streams
//! share the base window as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::h2::H2Settings;
use crate::quic::QuicSettings;

/// Receive window one process may lend to stalled streams, across all its
/// connections and both transports.
#[derive(Debug)]
pub struct StallBudget {
    limit: u64,
    lent: AtomicU64,
}

impl StallBudget {
    /// Server default: 256 MiB, 512 stalled QUIC streams across all agents.
    pub const SERVER: u64 = 256 * 1024 * 1024;
    /// Agent default: 16 MiB, 32 stalled QUIC streams (a kubelet or
    /// exporter that stops reading what the cloud sends).
    pub const AGENT: u64 = 16 * 1024 * 1024;

    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(StallBudget {
            limit,
            lent: AtomicU64::new(0),
        })
    }

    /// Bytes lent now.
    pub fn lent(&self) -> u64 {
        self.lent.load(Ordering::Relaxed)
    }

    fn take(&self, n: u64) -> bool {
        self.lent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |lent| {
                lent.checked_add(n).filter(|&after| after <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.lent.fetch_sub(n, Ordering::Relaxed);
    }
}

/// One connection's lending; cheap to clone, shared by its streams.
#[derive(Clone)]
pub struct StallCredit(Arc<Inner>);

struct Inner {
    window: Window,
    base: u64,
    per_stream: u64,
    budget: Arc<StallBudget>,
    /// Most streams of this connection that may hold lent credit.
    max_stalled: u64,
    /// Streams of this connection holding lent credit.
    stalled: Mutex<u64>,
}

/// How a new connection receive window reaches the transport.
enum Window {
    Quic(quinn::Connection),
    /// h2 changes the window through the `Connection` its task owns: the
    /// task applies what [`H2Window::next`] returns.
    H2(watch::Sender<u32>),
}

/// The HTTP/2 connection task's end of [`StallCredit::h2`].
pub struct H2Window(watch::Receiver<u32>);

impl H2Window {
    /// The next connection window to apply with `set_target_window_size`;
    /// pends forever once the credit is gone (use it in a `select!`).
    pub async fn next(&mut self) -> u32 {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.0.borrow_and_update()
    }
}

impl StallCredit {
    /// For a QUIC connection: its receive window is set directly.
    pub fn quic(
        conn: &quinn::Connection,
        settings: &QuicSettings,
        budget: &Arc<StallBudget>,
    ) -> Self {
        Self::new(
            Window::Quic(conn.clone()),
            settings.connection_window,
            settings.stream_window,
            budget,
        )
    }

    /// For an HTTP/2 connection: the task that drives it must apply every
    /// value the returned [`H2Window`] yields.
    pub fn h2(settings: &H2Settings, budget: &Arc<StallBudget>) -> (Self, H2Window) {
        let (tx, rx) = watch::channel(settings.connection_window);
        let credit = Self::new(
            Window::H2(tx),
            settings.connection_window,
            settings.stream_window,
            budget,
        );
        (credit, H2Window(rx))
    }

    fn new(window: Window, base: u32, per_stream: u32, budget: &Arc<StallBudget>) -> Self {
        let per_stream = u64::from(per_stream).max(1);
        StallCredit(Arc::new(Inner {
            window,
            base: base.into(),
            per_stream,
            max_stalled: (budget.limit / 4 / per_stream).max(1),
            budget: budget.clone(),
            stalled: Mutex::new(0),
        }))
    }

    /// A stream stopped taking data: lend it credit until the guard drops
    /// (the relay keeps it until the stream ends).
    pub fn stall(&self) -> StallGuard {
        let inner = &self.0;
        let mut stalled = inner.stalled.lock().unwrap_or_else(|e| e.into_inner());
        if *stalled >= inner.max_stalled || !inner.budget.take(inner.per_stream) {
            tracing::debug!(
                stalled = *stalled,
                lent = inner.budget.lent(),
                "stall credit spent; the stream shares the connection window"
            );
            return StallGuard(None);
        }
        *stalled += 1;
        self.set_window(*stalled);
        StallGuard(Some(self.clone()))
    }

    /// Streams of this connection holding lent credit now.
    pub fn stalled_streams(&self) -> u64 {
        *self.0.stalled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called with the `stalled` lock held, so concurrent changes set the
    /// window in the order they counted.
    fn set_window(&self, stalled: u64) {
        let inner = &self.0;
        let window = inner.base + stalled * inner.per_stream;
        match &inner.window {
            Window::Quic(conn) => conn
                .set_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX)),
            Window::H2(tx) => {
                // HTTP/2 windows are at most 2^31 - 1.
                let window = window.min(i32::MAX as u64) as u32;
                tx.send_replace(window);
            }
        }
    }
}

/// Held while a stream is stalled; gives the credit back when dropped.
pub struct StallGuard(Option<StallCredit>);

impl StallGuard {
    /// Whether credit was lent (false past the budget).
    pub fn is_lent(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for StallGuard {
    fn drop(&mut self) {
        if let Some(credit) = self.0.take() {
            let inner = &credit.0;
            let mut stalled = inner.stalled.lock().unwrap_or_else(|e| e.into_inner());
            *stalled = stalled.saturating_sub(1);
            credit.set_window(*stalled);
            inner.budget.give(inner.per_stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn window_grows_per_stalled_stream_within_the_budgets() {
        let settings = H2Settings::default();
        let per = u64::from(settings.stream_window);
        let base = settings.connection_window;
        // Room for 8 streams in the process, so 2 per connection.
        let budget = StallBudget::new(8 * per);
        let (credit, mut window) = StallCredit::h2(&settings, &budget);
        let a = credit.stall();
        let b = credit.stall();
        assert_eq!(window.next().await, base + 2 * settings.stream_window);
        assert_eq!(credit.stalled_streams(), 2);
        // The connection's share is spent; the stream gets nothing.
        let c = credit.stall();
        assert!(!c.is_lent());
        assert_eq!(credit.stalled_streams(), 2);
        drop(a);
        assert_eq!(window.next().await, base + settings.stream_window);

        // Another connection of the process draws on the same budget.
        let others: Vec<_> = (0..3)
            .map(|_| StallCredit::h2(&settings, &budget))
            .collect();
        let held: Vec<_> = others
            .iter()
            .flat_map(|(credit, _)| [credit.stall(), credit.stall()])
            .collect();
        assert_eq!(held.iter().filter(|g| g.is_lent()).count(), 6);
        assert_eq!(budget.lent(), 7 * per);
        let last = credit.stall();
        assert!(last.is_lent());
        let (fresh, _) = StallCredit::h2(&settings, &budget);
        assert!(!fresh.stall().is_lent(), "the process budget is spent");
        drop((b, c, last, held));
        assert_eq!(budget.lent(), 0);
        assert_eq!(window.next().await, base);
        assert_eq!(credit.stalled_streams(), 0);
    }
}
