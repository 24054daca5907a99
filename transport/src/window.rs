//! The receive windows a process advertises, under one budget.
//!
//! Data a peer has sent but no TCP client has taken yet sits in memory:
//! in the transport's receive buffers until the relay reads it. How much a
//! peer may send ahead is its connection's receive window, so the sum of
//! the windows a process advertises bounds that memory. [`ReceiveBudget`]
//! is that sum's limit, one per process: every connection's window is
//! drawn from it.
//!
//! - **Shares.** Each connection's base window is the budget (less what
//!   is lent, below) divided by the connections, capped at the
//!   transport's configured connection window and never below [`FLOOR`].
//!   One agent gets the whole configured window; a thousand share the
//!   budget. The share is rounded down to a step (four per doubling), and
//!   every connection's window is set again only when the step changes,
//!   so a fleet connecting costs a few dozen sweeps, not one per agent.
//!   Windows that shrink do so as the peer's data is read: credit already
//!   granted is never taken back (neither QUIC nor HTTP/2 can).
//! - **Stall credit.** Both transports have stream and connection windows.
//!   Data a stream's reader has not taken counts against the connection,
//!   so a few streams whose TCP client stopped reading (a `kubectl logs`
//!   to a stuck terminal) would use up the connection's window and stall
//!   every other stream, new ones included: head-of-line blocking by flow
//!   control. The relay reports a stream as stalled when one of its TCP
//!   writes has been blocked for [`crate::relay::STALL_AFTER`];
//!   [`ReceiveWindow::stall`] then widens that connection's window by one
//!   stream window (the most the stream can hold) until the stream ends.
//!   A stream is lent once: returning the credit whenever a write goes
//!   through would move the window with every chunk of a slow reader.
//!   What is lent comes out of the same budget, so every share shrinks as
//!   it fills. Lending stops at three quarters of the budget (the shares
//!   keep a quarter), at a quarter of it for one connection, and at
//!   [`BudgetLimits::per_client`] for the streams of one client address
//!   (IPv4, or IPv6 /64) across all connections: one client that stops
//!   reading on many streams cannot spend what the others need. Past any
//!   of these, stalled streams share their connection's window as before.
//!
//! The bound: the windows advertised add up to at most the budget, unless
//! there are more connections than `budget / FLOOR` (then each has the
//! floor). Nothing here runs per relayed chunk: a connection's join and
//! leave, a stall and its end take one lock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::watch;

use crate::h2::H2Settings;
use crate::quic::QuicSettings;

/// The smallest base window a connection is given, whatever the budget:
/// one relay chunk.
pub const FLOOR: u64 = 64 * 1024;

/// What one [`ReceiveBudget`] allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetLimits {
    /// All receive windows of the process together, lent credit included.
    pub total: u64,
    /// Stall credit lent to the streams of one client address.
    pub per_client: u64,
}

impl BudgetLimits {
    /// Server default: 256 MiB (64 agents at the full 4 MiB QUIC window,
    /// and what the lent credit may take), 32 MiB per client (64 stalled
    /// QUIC streams).
    pub const SERVER: BudgetLimits = BudgetLimits {
        total: 256 * 1024 * 1024,
        per_client: 32 * 1024 * 1024,
    };
    /// Agent default: 64 MiB; the agent's one client is the cloud.
    pub const AGENT: BudgetLimits = BudgetLimits {
        total: 64 * 1024 * 1024,
        per_client: 64 * 1024 * 1024,
    };
}

/// Why a stalled stream was lent nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Three quarters of the budget are lent.
    Process,
    /// Its connection holds a quarter of the budget.
    Connection,
    /// Its client's streams hold [`BudgetLimits::per_client`].
    Client,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::Process, Refusal::Connection, Refusal::Client];

    /// Stable metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Process => "process",
            Refusal::Connection => "connection",
            Refusal::Client => "client",
        }
    }
}

/// The budget's state now, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetStats {
    pub limits: BudgetLimits,
    /// Connections drawing on the budget.
    pub connections: u64,
    /// Every connection's window as last set, lent credit included.
    pub windows: u64,
    /// Lent to stalled streams.
    pub lent: u64,
    /// The base window each connection gets now (before its own cap).
    pub share: u64,
}

/// One process's receive-window budget; see the module doc.
#[derive(Debug)]
pub struct ReceiveBudget {
    limits: BudgetLimits,
    state: Mutex<State>,
    refused: [AtomicU64; 3],
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    conns: HashMap<u64, Weak<Conn>>,
    lent: u64,
    clients: HashMap<IpAddr, u64>,
    share: u64,
}

impl ReceiveBudget {
    pub fn new(limits: BudgetLimits) -> Arc<Self> {
        Arc::new(ReceiveBudget {
            limits,
            state: Mutex::new(State {
                share: step_down(limits.total),
                ..State::default()
            }),
            refused: Default::default(),
        })
    }

    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    /// Bytes lent to stalled streams now.
    pub fn lent(&self) -> u64 {
        self.lock().lent
    }

    /// Stalled streams lent nothing since start, for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    /// The budget now (walks the connections: call it at scrape time).
    pub fn stats(&self) -> BudgetStats {
        let state = self.lock();
        // Dropped after the lock: the last reference to one takes it again.
        let live: Vec<Arc<Conn>> = state.conns.values().filter_map(Weak::upgrade).collect();
        let stats = BudgetStats {
            limits: self.limits,
            connections: live.len() as u64,
            windows: live.iter().map(|c| c.applied.load(Ordering::Relaxed)).sum(),
            lent: state.lent,
            share: state.share,
        };
        drop(state);
        drop(live);
        stats
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Most that may be lent: the shares keep a quarter.
    fn lend_limit(&self) -> u64 {
        self.limits.total / 4 * 3
    }

    /// The share for the state now, rounded down to a step.
    fn share_for(&self, state: &State) -> u64 {
        let n = (state.conns.len() as u64).max(1);
        step_down(self.limits.total.saturating_sub(state.lent) / n)
    }

    /// After a change of `state`: if the share moved to another step,
    /// every connection's window is set again; otherwise only `changed`'s.
    /// Returns the connections it touched, to be dropped by the caller
    /// after the lock is released (dropping the last reference to one
    /// takes the lock again).
    fn settle(&self, state: &mut State, changed: Option<&Conn>) -> Vec<Arc<Conn>> {
        let share = self.share_for(state);
        if share == state.share {
            if let Some(conn) = changed {
                conn.apply(share);
            }
            return Vec::new();
        }
        state.share = share;
        let live: Vec<Arc<Conn>> = state.conns.values().filter_map(Weak::upgrade).collect();
        for conn in &live {
            conn.apply(share);
        }
        live
    }

    fn join(self: &Arc<Self>, sink: Sink, base: u32, per_stream: u32) -> ReceiveWindow {
        let per_stream = u64::from(per_stream).max(1);
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        let conn = Arc::new(Conn {
            id,
            sink,
            base: base.into(),
            per_stream,
            max_stalled: (self.limits.total / 4 / per_stream).max(1),
            stalled: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            budget: self.clone(),
        });
        state.conns.insert(id, Arc::downgrade(&conn));
        let touched = self.settle(&mut state, Some(&conn));
        drop(state);
        drop(touched);
        ReceiveWindow(conn)
    }

    fn leave(&self, id: u64) {
        let mut state = self.lock();
        state.conns.remove(&id);
        let touched = self.settle(&mut state, None);
        drop(state);
        drop(touched);
    }
}

/// Rounds down to a step: [`FLOOR`] times 2^(k/4), never below [`FLOOR`].
fn step_down(bytes: u64) -> u64 {
    // 2^(k/4) for k = 0..4, in thousandths.
    const STEPS: [u64; 4] = [1000, 1189, 1414, 1682];
    let mut best = FLOOR;
    let mut octave = FLOOR;
    while octave <= bytes {
        for s in STEPS {
            let step = u64::try_from(u128::from(octave) * u128::from(s) / 1000).unwrap_or(u64::MAX);
            if step <= bytes {
                best = step;
            }
        }
        match octave.checked_mul(2) {
            Some(next) => octave = next,
            None => break,
        }
    }
    best
}

/// The unit the per-client limit counts: an IPv4 address (IPv4-mapped
/// IPv6 included), or an IPv6 /64 (one host usually owns a whole /64).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// How a window reaches the transport.
#[derive(Debug)]
enum Sink {
    Quic(quinn::Connection),
    /// h2 changes the window through the `Connection` its task owns: the
    /// task applies what [`H2Window::next`] returns.
    H2(watch::Sender<u32>),
}

#[derive(Debug)]
struct Conn {
    id: u64,
    sink: Sink,
    /// The transport's configured connection window: the most the share
    /// gives this connection.
    base: u64,
    /// One stream window: what a stalled stream is lent.
    per_stream: u64,
    max_stalled: u64,
    /// Streams holding lent credit (changed under the budget's lock).
    stalled: AtomicU64,
    /// The window last set.
    applied: AtomicU64,
    budget: Arc<ReceiveBudget>,
}

impl Conn {
    /// Sets the window for `share`; called with the budget's lock held, so
    /// changes reach the transport in the order they were decided.
    fn apply(&self, share: u64) {
        let window = share.min(self.base) + self.stalled.load(Ordering::Relaxed) * self.per_stream;
        self.applied.store(window, Ordering::Relaxed);
        match &self.sink {
            Sink::Quic(conn) => conn
                .set_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX)),
            Sink::H2(tx) => {
                // HTTP/2 windows are at most 2^31 - 1.
                tx.send_replace(window.min(i32::MAX as u64) as u32);
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.budget.leave(self.id);
    }
}

/// One connection's receive window; cheap to clone, shared by its streams.
/// The connection leaves the budget when the last clone drops.
#[derive(Clone, Debug)]
pub struct ReceiveWindow(Arc<Conn>);

/// The HTTP/2 connection task's end of [`ReceiveWindow::h2`].
pub struct H2Window(watch::Receiver<u32>);

impl H2Window {
    /// The next connection window to apply with `set_target_window_size`
    /// (h2 shrinks the window as data is read when it is lower); pends
    /// forever once the window is gone (use it in a `select!`).
    pub async fn next(&mut self) -> u32 {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.0.borrow_and_update()
    }
}

impl ReceiveWindow {
    /// For a QUIC connection: its receive window is set directly, now.
    pub fn quic(
        conn: &quinn::Connection,
        settings: &QuicSettings,
        budget: &Arc<ReceiveBudget>,
    ) -> Self {
        budget.join(
            Sink::Quic(conn.clone()),
            settings.connection_window,
            settings.stream_window,
        )
    }

    /// For an HTTP/2 connection: the task that drives it must apply every
    /// value the returned [`H2Window`] yields, the first one at once.
    pub fn h2(settings: &H2Settings, budget: &Arc<ReceiveBudget>) -> (Self, H2Window) {
        let (tx, rx) = watch::channel(settings.connection_window);
        let window = budget.join(
            Sink::H2(tx),
            settings.connection_window,
            settings.stream_window,
        );
        let mut rx = rx;
        // The first value counts as news even when join set the same one.
        rx.mark_changed();
        (window, H2Window(rx))
    }

    /// A stream stopped taking data: lend it credit until the guard drops
    /// (the relay keeps it until the stream ends). `client` is the address
    /// of the TCP client it relays to, where that is a limit's unit.
    pub fn stall(&self, client: Option<IpAddr>) -> StallGuard {
        let conn = &self.0;
        let budget = &conn.budget;
        let client = client.map(client_key);
        let mut state = budget.lock();
        let stalled = conn.stalled.load(Ordering::Relaxed);
        let per = conn.per_stream;
        let refusal = if stalled >= conn.max_stalled {
            Some(Refusal::Connection)
        } else if state.lent + per > budget.lend_limit() {
            Some(Refusal::Process)
        } else if client.is_some_and(|c| {
            state.clients.get(&c).copied().unwrap_or(0) + per > budget.limits.per_client
        }) {
            Some(Refusal::Client)
        } else {
            None
        };
        if let Some(reason) = refusal {
            budget.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                stalled,
                lent = state.lent,
                reason = reason.label(),
                "no stall credit; the stream shares its connection's window"
            );
            return StallGuard(None);
        }
        state.lent += per;
        if let Some(c) = client {
            *state.clients.entry(c).or_default() += per;
        }
        conn.stalled.fetch_add(1, Ordering::Relaxed);
        let touched = budget.settle(&mut state, Some(conn));
        drop(state);
        drop(touched);
        StallGuard(Some(Lent {
            window: self.clone(),
            client,
        }))
    }

    /// Streams of this connection holding lent credit now.
    pub fn stalled_streams(&self) -> u64 {
        self.0.stalled.load(Ordering::Relaxed)
    }

    /// This connection's window as last set, lent credit included.
    pub fn window(&self) -> u64 {
        self.0.applied.load(Ordering::Relaxed)
    }
}

struct Lent {
    window: ReceiveWindow,
    client: Option<IpAddr>,
}

/// Held while a stream is stalled; gives the credit back when dropped.
pub struct StallGuard(Option<Lent>);

impl StallGuard {
    /// Whether credit was lent (false past a limit).
    pub fn is_lent(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for StallGuard {
    fn drop(&mut self) {
        let Some(lent) = self.0.take() else { return };
        let conn = &lent.window.0;
        let budget = &conn.budget;
        let per = conn.per_stream;
        let mut state = budget.lock();
        state.lent = state.lent.saturating_sub(per);
        if let Some(c) = lent.client {
            if let Some(held) = state.clients.get_mut(&c) {
                *held = held.saturating_sub(per);
                if *held == 0 {
                    state.clients.remove(&c);
                }
            }
        }
        conn.stalled.fetch_sub(1, Ordering::Relaxed);
        let touched = budget.settle(&mut state, Some(conn));
        drop(state);
        drop(touched);
        // `lent` (and with it perhaps the last reference to the
        // connection) drops here, after the lock is released.
    }
}

#[cfg(test)]
mod tests;
