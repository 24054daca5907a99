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
//! The relay reports a stream as stalled when its TCP write has been
//! blocked for [`crate::relay::STALL_AFTER`]; [`StallCredit`] then widens
//! the connection's receive window by one stream window (the most that
//! stream can hold) for as long as it stays stalled, so the other streams
//! keep the whole base window. What all connections of the process may
//! borrow is capped (`QuicSettings::stall_budget`); past it, stalled
//! streams share the base window as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::h2::H2Settings;
use crate::quic::QuicSettings;

/// Receive window lent to stalled streams, process-wide.
static LENT: AtomicU64 = AtomicU64::new(0);

/// Bytes of receive window this process currently lends to stalled streams.
pub fn lent() -> u64 {
    LENT.load(Ordering::Relaxed)
}

/// One connection's lending; cheap to clone, shared by its streams.
#[derive(Clone)]
pub struct StallCredit(Arc<Inner>);

struct Inner {
    window: Window,
    base: u64,
    per_stream: u64,
    budget: u64,
    /// Streams of this connection holding lent credit.
    stalled: Mutex<u64>,
}

/// How a new connection receive window reaches the transport.
enum Window {
    Quic(quinn::Connection),
    /// h2 changes the window through the `Connection` its task owns: the
    /// task watches this and calls `set_target_window_size`.
    H2(watch::Sender<u32>),
}

impl StallCredit {
    /// For a QUIC connection: its receive window is set directly.
    pub fn quic(conn: &quinn::Connection, settings: &QuicSettings) -> Self {
        Self::new(
            Window::Quic(conn.clone()),
            settings.connection_window,
            settings.stream_window,
            settings.stall_budget,
        )
    }

    /// For an HTTP/2 connection: the task that drives it must apply every
    /// value the returned receiver sees with `set_target_window_size`.
    pub fn h2(settings: &H2Settings, budget: u64) -> (Self, watch::Receiver<u32>) {
        let (tx, rx) = watch::channel(settings.connection_window);
        let credit = Self::new(
            Window::H2(tx),
            settings.connection_window,
            settings.stream_window,
            budget,
        );
        (credit, rx)
    }

    fn new(window: Window, base: u32, per_stream: u32, budget: u64) -> Self {
        StallCredit(Arc::new(Inner {
            window,
            base: base.into(),
            per_stream: per_stream.into(),
            budget,
            stalled: Mutex::new(0),
        }))
    }

    /// A stream stopped taking data: lend it credit until the guard drops.
    pub fn stall(&self) -> StallGuard {
        let inner = &self.0;
        let before = LENT.fetch_add(inner.per_stream, Ordering::Relaxed);
        if before + inner.per_stream > inner.budget {
            LENT.fetch_sub(inner.per_stream, Ordering::Relaxed);
            tracing::debug!(
                budget = inner.budget,
                "stall budget spent; the stream shares the connection window"
            );
            return StallGuard(None);
        }
        self.adjust(1);
        StallGuard(Some(self.clone()))
    }

    /// Streams of this connection holding lent credit now.
    pub fn stalled_streams(&self) -> u64 {
        *self.0.stalled.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn adjust(&self, delta: i64) {
        let inner = &self.0;
        // Under the lock, so concurrent stalls and resumes set the window
        // in the order they counted.
        let mut stalled = inner.stalled.lock().unwrap_or_else(|e| e.into_inner());
        *stalled = stalled.saturating_add_signed(delta);
        let window = inner.base + *stalled * inner.per_stream;
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

impl Drop for StallGuard {
    fn drop(&mut self) {
        if let Some(credit) = self.0.take() {
            credit.adjust(-1);
            LENT.fetch_sub(credit.0.per_stream, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_per_stalled_stream_within_the_budget() {
        let settings = H2Settings::default();
        let (credit, rx) = StallCredit::h2(&settings, u64::MAX);
        let base = settings.connection_window;
        let a = credit.stall();
        let b = credit.stall();
        assert_eq!(*rx.borrow(), base + 2 * settings.stream_window);
        assert_eq!(credit.stalled_streams(), 2);
        drop(a);
        assert_eq!(*rx.borrow(), base + settings.stream_window);
        drop(b);
        assert_eq!(*rx.borrow(), base);
        assert_eq!(credit.stalled_streams(), 0);

        // Past the budget, stalled streams get nothing.
        let per = u64::from(settings.stream_window);
        // Room for exactly one more stream on top of what other tests lend.
        let (credit, rx) = StallCredit::h2(&settings, lent() + per);
        let first = credit.stall();
        let second = credit.stall();
        assert_eq!(credit.stalled_streams(), 1);
        assert_eq!(
            *rx.borrow(),
            settings.connection_window + settings.stream_window
        );
        drop(second);
        assert_eq!(credit.stalled_streams(), 1);
        drop(first);
        assert_eq!(*rx.borrow(), settings.connection_window);
    }
}
