//! Duplex relay between a TCP socket and a tunnel stream.
//!
//! Both directions run in one task (no cross-task hand-off per chunk):
//! - TCP EOF (the peer shut its write side) → FIN on the tunnel stream, and
//!   tunnel EOF → `shutdown(Write)` on the socket, so half-closed
//!   connections keep receiving the rest of the response.
//! - A TCP reset → the tunnel stream is reset (and stopped) with
//!   `TCP_RESET`; a tunnel reset or a lost connection → the socket is closed
//!   with an RST (SO_LINGER 0). Either way the whole connection ends, as it
//!   would on a real TCP path.
//!
//! Each direction owns one buffer that starts small and doubles (up to
//! `MAX_BUF`) while reads keep filling it, so idle connections cost little
//! and bulk transfers make few, large writes. Growth is drawn from a
//! [`BufferBudget`] the caller owns (one per process in the binaries): a
//! burst of a thousand busy connections cannot grow every buffer at once;
//! the ones over budget keep relaying with the buffer they have.
//!
//! Two optional limits end a relay that would otherwise hold its stream,
//! window and descriptors for good: [`RelayLimits::reader_gone_after`] (the
//! TCP peer stopped reading) and [`RelayLimits::idle_after`] (nothing moved
//! either way). The idle check costs one clock read per chunk and one
//! timer per idle period, never a timer reset per chunk.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use proto::codes::stream as code;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::stream::{write_chunk, StreamOrder, TunnelRecv, TunnelSend};
use crate::window::{ReceiveWindow, StallGuard};

/// A write to TCP blocked this long means its reader has stalled; see
/// [`ReceiveWindow::stall`].
pub const STALL_AFTER: Duration = Duration::from_millis(100);

/// First buffer size per direction.
pub const MIN_BUF: usize = 4 * 1024;
/// Largest buffer size per direction.
pub const MAX_BUF: usize = 64 * 1024;
/// Bytes the relays sharing one [`BufferBudget`] may hold above `MIN_BUF`
/// per direction, by default (`--relay-buffer-budget`): 16 MiB, the relay
/// buffer memory beyond the 8 KiB every connection costs (256 connections
/// at full size).
pub const GROWTH_BUDGET: usize = 16 * 1024 * 1024;

/// What relay buffers may grow into, shared by the relays of a process.
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    grown: AtomicUsize,
    /// Doublings refused because the budget was spent.
    refused: AtomicU64,
}

impl BufferBudget {
    pub fn new(limit: u64) -> Self {
        BufferBudget {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            grown: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The most the relays may hold above their first buffers.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes the relays hold above their first buffers now.
    pub fn grown(&self) -> usize {
        self.grown.load(Ordering::Relaxed)
    }

    /// How many times a buffer was kept at its size because the budget was
    /// spent (the relay went on with the buffer it had).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Default for BufferBudget {
    fn default() -> Self {
        Self::new(GROWTH_BUDGET as u64)
    }
}

/// A relay buffer size whose growth beyond `MIN_BUF` is accounted against
/// a budget and given back when it drops.
struct Grant<'a> {
    size: usize,
    budget: &'a BufferBudget,
    /// Full reads left before a buffer the budget refused asks again.
    held_back: u8,
}

/// Full reads a refused buffer waits before asking the budget again: a
/// spent budget costs a counter in the relay per chunk, not three atomic
/// operations on a line every relay of the process shares.
const ASK_AGAIN_AFTER: u8 = 64;

impl<'a> Grant<'a> {
    fn new(budget: &'a BufferBudget) -> Self {
        Grant {
            size: MIN_BUF,
            budget,
            held_back: 0,
        }
    }

    /// Doubles the size if it is below `MAX_BUF` and the budget allows;
    /// whether it did. Called only when a read filled the buffer: a few
    /// times per connection, never per chunk once at the largest size, and
    /// once per [`ASK_AGAIN_AFTER`] full reads while the budget refuses.
    fn grow(&mut self) -> bool {
        let len = self.size;
        if len >= MAX_BUF {
            return false;
        }
        if self.held_back > 0 {
            self.held_back -= 1;
            return false;
        }
        let add = len;
        let before = self.budget.grown.fetch_add(add, Ordering::Relaxed);
        if before + add > self.budget.limit {
            self.budget.grown.fetch_sub(add, Ordering::Relaxed);
            self.budget.refused.fetch_add(1, Ordering::Relaxed);
            self.held_back = ASK_AGAIN_AFTER;
            return false;
        }
        self.size = len * 2;
        true
    }
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        self.budget
            .grown
            .fetch_sub(self.size - MIN_BUF, Ordering::Relaxed);
    }
}

/// The tunnel → TCP buffer: one `Vec` the stream's data is read into and
/// written to TCP from.
struct RelayBuf<'a> {
    data: Vec<u8>,
    grant: Grant<'a>,
}

impl<'a> RelayBuf<'a> {
    fn new(budget: &'a BufferBudget) -> Self {
        RelayBuf {
            data: vec![0; MIN_BUF],
            grant: Grant::new(budget),
        }
    }

    fn grow(&mut self) {
        if self.grant.grow() {
            self.data.resize(self.grant.size, 0);
        }
    }
}

/// The TCP → tunnel buffer: owned chunks for [`TunnelSend::poll_write_chunk`]
/// (quinn and h2 keep what they are given until the peer has it; a
/// borrowed write makes them copy it into a fresh allocation).
///
/// Reads land in a slab of the read size. A read that fills at least half
/// of it is handed over as it is, no copy; the slab is then shared with
/// the transport, later reads fill its tail and go without a copy too, and
/// once every chunk of it is gone it is read into again. A smaller read
/// into a slab not yet shared is copied out (as the transport would have)
/// and the slab reused at once, so a slab the transport pins always holds
/// a chunk of at least half its size: the transport's buffered bytes pin
/// at most twice their size, and the relay's own slab stays within
/// `--relay-buffer-budget`. A bulk transfer costs one allocation per full
/// read (what the transport's copy cost) and no copy.
struct ChunkBuf<'a> {
    slab: BytesMut,
    grant: Grant<'a>,
    /// The slab's memory is also in chunks handed over.
    shared: bool,
}

/// Below this much room left in a shared slab, the next read gets a new
/// one rather than a sliver.
const SLAB_TAIL: usize = MIN_BUF / 4;

impl<'a> ChunkBuf<'a> {
    fn new(budget: &'a BufferBudget) -> Self {
        ChunkBuf {
            slab: BytesMut::with_capacity(MIN_BUF),
            grant: Grant::new(budget),
            shared: false,
        }
    }

    /// Makes room for the next read; how much it may take.
    fn room(&mut self) -> usize {
        let size = self.grant.size;
        let spare = self.slab.capacity() - self.slab.len();
        if spare >= size {
            return size;
        }
        if self.shared {
            // Every chunk of it gone: ours alone again, no allocation.
            if self.slab.try_reclaim(size) {
                self.shared = false;
                return size;
            }
            if spare >= SLAB_TAIL {
                return spare;
            }
        }
        // Used up and still pinned, or smaller than the grant has grown.
        self.slab = BytesMut::with_capacity(size);
        self.shared = false;
        size
    }

    /// Reads once from `r` behind what the slab holds; the bytes read (0:
    /// EOF).
    async fn read<R: AsyncRead + Unpin + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        let room = self.room();
        r.read_buf(&mut (&mut self.slab).limit(room)).await
    }

    /// What the slab holds, as a chunk for the transport.
    fn take(&mut self) -> Bytes {
        if self.shared || self.slab.len() * 2 >= self.grant.size {
            self.shared = true;
            return self.slab.split().freeze();
        }
        let chunk = Bytes::copy_from_slice(&self.slab);
        self.slab.clear();
        chunk
    }
}

/// Longest wait for the peer to acknowledge a finished stream.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// What one level of a stream's send priority stands for
/// ([`StreamOrder::LeastServed`]): a stream that sent this much more than
/// another lately yields to it. A GSO batch's worth, so streams take
/// turns in runs of ~45 packets.
pub const SERVICE_QUANTUM: usize = 64 * 1024;

/// How fast what a stream sent stops counting against it: halved every
/// this long. A new transfer takes the connection from an old one that
/// saturated it for about this long before they take turns; an
/// interactive stream is back at the top within a few of them.
pub const SERVICE_HALF_LIFE: Duration = Duration::from_millis(250);

/// Distinct priorities within one level. Streams at the same level are
/// ordered by the slot they drew when they started (slots are dealt in
/// turn), not interleaved packet by packet as quinn does with equal
/// priorities.
const SLOTS: i32 = 1024;

/// The levels a priority can express below 0 (the rest saturate there);
/// far above any real level, which is bounded by a stream's rate times
/// the half-life (~7,000 at 10 Gbit/s).
const MAX_LEVEL: i32 = i32::MAX / SLOTS - 1;

/// A stream's recent service, in quanta, decaying with
/// [`SERVICE_HALF_LIFE`], and the send priority it maps to: minus its
/// whole quanta times [`SLOTS`], minus its slot.
#[derive(Debug)]
struct RecentService {
    level: f64,
    at: Instant,
    slot: i32,
    priority: i32,
}

impl RecentService {
    fn new(now: Instant, slot: i32) -> Self {
        RecentService {
            level: 0.0,
            at: now,
            slot,
            priority: -slot,
        }
    }

    /// Counts `n` bytes sent at `now`; the new priority if it changed.
    fn sent(&mut self, now: Instant, n: usize) -> Option<i32> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let decay = (-elapsed / SERVICE_HALF_LIFE.as_secs_f64()).exp2();
        self.level = self.level * decay + n as f64 / SERVICE_QUANTUM as f64;
        // `as` saturates; the level is never negative.
        let whole = (self.level as i32).min(MAX_LEVEL);
        let priority = -(whole * SLOTS + self.slot);
        (priority != self.priority).then(|| {
            self.priority = priority;
            priority
        })
    }
}

/// Ranks what a stream sends by [`StreamOrder`]: one clock read per
/// write, and a priority change (which takes the connection's lock) when
/// the stream starts and at most about once a quantum after.
struct Ranking(Option<RecentService>);

impl Ranking {
    fn new<W: TunnelSend + ?Sized>(order: StreamOrder, w: &mut W) -> Self {
        static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
        Ranking(match order {
            StreamOrder::LeastServed => {
                let slot = (NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS as usize) as i32;
                let service = RecentService::new(Instant::now(), slot);
                w.set_priority(service.priority);
                Some(service)
            }
            StreamOrder::RoundRobin => None,
        })
    }

    /// Before `n` bytes are written: the priority they queue at counts
    /// them, and the decay since the stream last sent, so the first
    /// keystroke after an idle spell does not queue at the level the
    /// stream had when it went quiet.
    fn sending<W: TunnelSend + ?Sized>(&mut self, w: &mut W, n: usize) {
        if let Some(service) = &mut self.0 {
            if let Some(priority) = service.sent(Instant::now(), n) {
                w.set_priority(priority);
            }
        }
    }
}

/// Which way bytes moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the local TCP socket into the tunnel.
    TcpToTunnel,
    /// From the tunnel onto the local TCP socket.
    TunnelToTcp,
}

/// What bounds one relay.
#[derive(Clone, Copy)]
pub struct RelayLimits<'a> {
    /// The connection's [`ReceiveWindow`], told when the TCP side stops
    /// taking the stream's data (`None`: never lend).
    pub stall: Option<&'a ReceiveWindow>,
    /// The TCP client's address, where the stall credit counts per client
    /// (the server's ingresses); `None` on the agent.
    pub client: Option<IpAddr>,
    /// What the two copy buffers may grow into.
    pub buffers: &'a BufferBudget,
    /// Reset both sides when one write of tunnel data to the TCP side
    /// (at most [`MAX_BUF`]) stays blocked this long: the TCP peer stopped
    /// reading, and its unread data would pin window and memory for good.
    /// `None`: wait as long as it takes.
    pub reader_gone_after: Option<Duration>,
    /// The same, sooner, for a stalled stream its [`ReceiveWindow`] could
    /// lend nothing (the budget, the connection's or the client's part of
    /// it is spent): under overload the streams whose clients stopped
    /// reading are shed, so that they do not take the flowing streams'
    /// window. `None`: such a stream waits like any other.
    pub unlent_gone_after: Option<Duration>,
    /// Reset both sides when no byte has moved either way for this long
    /// (`None`: a quiet connection may stay open for good; `kubectl logs
    /// -f` and `exec` sessions are often quiet for hours).
    pub idle_after: Option<Duration>,
    /// Bytes to send into the tunnel before the first TCP bytes, held
    /// until those come (`None`: nothing to send first).
    pub opening: Option<Opening<'a>>,
    /// How the stream's connection orders its streams' data: whether the
    /// relay lowers the stream's send priority as it sends.
    pub order: StreamOrder,
    /// Where the relay records which directions have finished, for a
    /// caller that reports on open relays (the agent's drain log).
    pub progress: Option<&'a RelayProgress>,
    /// Resets both sides once it is stopped, whatever they are doing (the
    /// server: the client's credential was revoked). `None`: nothing
    /// outside the relay ends it.
    pub stop: Option<&'a StopSignal>,
}

/// A stop a relay can wait on while it runs. The relay polls it at every
/// wake-up, that is per chunk, so polling must be cheap: an atomic flag
/// and an [`AtomicWaker`](futures_util::task::AtomicWaker), no lock (a
/// tokio `watch` or `Notify` takes a mutex on each poll of a waiting
/// future). Whoever decides (a task of its own) calls [`StopSignal::stop`].
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl StopSignal {
    /// Stops every relay waiting on this signal.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Completes once [`Self::stop`] was called. One waiter at a time.
    pub fn stopped(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            if self.stopped.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.stopped.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// Which directions of a running relay have passed their FIN on: set once
/// per direction when it ends (never per chunk), read by whoever reports
/// on the relays still open. A relay that ends on a reset or a limit sets
/// nothing: it is gone a moment later.
#[derive(Debug, Default)]
pub struct RelayProgress(AtomicU8);

impl RelayProgress {
    const TCP_TO_TUNNEL: u8 = 1;
    const TUNNEL_TO_TCP: u8 = 2;

    fn finished(&self, dir: Direction) {
        let bit = match dir {
            Direction::TcpToTunnel => Self::TCP_TO_TUNNEL,
            Direction::TunnelToTcp => Self::TUNNEL_TO_TCP,
        };
        self.0.fetch_or(bit, Ordering::Relaxed);
    }

    /// Whether `dir` has ended with a FIN passed on.
    pub fn is_finished(&self, dir: Direction) -> bool {
        let bit = match dir {
            Direction::TcpToTunnel => Self::TCP_TO_TUNNEL,
            Direction::TunnelToTcp => Self::TUNNEL_TO_TCP,
        };
        self.0.load(Ordering::Relaxed) & bit != 0
    }

    /// Both directions in words, the TCP side called `tcp` ("client",
    /// "target"): `target to tunnel open, tunnel to target finished`.
    pub fn describe(&self, tcp: &str) -> String {
        let state = |dir| {
            if self.is_finished(dir) {
                "finished"
            } else {
                "open"
            }
        };
        format!(
            "{tcp} to tunnel {}, tunnel to {tcp} {}",
            state(Direction::TcpToTunnel),
            state(Direction::TunnelToTcp)
        )
    }
}

/// A frame the relay sends into the tunnel ahead of the TCP side's first
/// bytes, in the same write, so that both go in one packet: the agent's
/// `DialResult` for a dial the server does not wait on. It waits for those
/// bytes at most `hold` (the other direction flows meanwhile), then goes
/// alone; an EOF from the TCP side sends it before the FIN. A reset of the
/// TCP side before any byte resets the stream without it. Frames longer
/// than half of [`MIN_BUF`] go alone at once.
#[derive(Clone, Copy, Debug)]
pub struct Opening<'a> {
    pub frame: &'a [u8],
    pub hold: Duration,
}

/// The error a write gives when its reader took longer than
/// [`RelayLimits::reader_gone_after`].
#[derive(Debug, thiserror::Error)]
#[error("the TCP peer read nothing for {after:?}")]
struct ReaderGone {
    after: Duration,
    /// Whether the stream had been refused stall credit.
    unlent: bool,
}

/// How a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Both directions finished with FIN.
    Closed,
    /// The TCP side reset or failed; the tunnel stream was reset.
    TcpReset,
    /// The tunnel side reset or was lost; the TCP socket was reset.
    TunnelReset,
    /// The TCP peer stopped reading for longer than allowed; both sides
    /// were reset. `unlent`: it was refused stall credit, and reset after
    /// [`RelayLimits::unlent_gone_after`].
    ReaderGone { unlent: bool },
    /// Nothing moved either way for longer than allowed; both sides were
    /// reset.
    Idle,
    /// [`RelayLimits::stop`] completed; both sides were reset.
    Stopped,
}

/// Totals for one relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayStats {
    pub outcome: RelayOutcome,
    pub tcp_to_tunnel: u64,
    pub tunnel_to_tcp: u64,
    /// How the [`Opening`] went, if there was one and it was sent.
    pub opening: Option<OpeningSent>,
}

/// How an [`Opening`] frame was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpeningSent {
    /// With the TCP side's first bytes, in one write.
    WithData,
    /// Alone, once its hold was over (or it was too long to share).
    Alone,
    /// Alone, before the FIN of a TCP side that sent nothing.
    BeforeEof,
}

impl OpeningSent {
    /// Stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            OpeningSent::WithData => "with_data",
            OpeningSent::Alone => "alone",
            OpeningSent::BeforeEof => "before_eof",
        }
    }
}

/// What one direction of a relay moved.
#[derive(Default)]
struct Tally {
    bytes: u64,
    opening: Option<OpeningSent>,
}

enum Failure {
    Tcp(io::Error),
    Tunnel(io::Error),
    Idle(Duration),
    Stopped,
}

/// When the relay last moved a chunk, for [`RelayLimits::idle_after`]: an
/// atomic (both directions run in one task, but the relay future must stay
/// `Send`), written with one relaxed store per chunk.
struct Activity {
    start: tokio::time::Instant,
    /// Nanoseconds from `start` to the last chunk.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// Completes once nothing has moved for `after`: one timer per idle
    /// period, re-armed from the last chunk when it fires early.
    async fn idle(&self, after: Option<Duration>) -> Failure {
        let Some(after) = after else {
            return std::future::pending().await;
        };
        loop {
            let deadline = self.last() + after;
            if tokio::time::Instant::now() >= deadline {
                return Failure::Idle(after);
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The client side of a relay: a byte stream that can be read and written
/// at once from one task, and closed with a reset. TCP and Unix sockets
/// split into borrowed halves (no lock per chunk).
pub trait ClientSocket: Send {
    type Read<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;

    /// The two halves, for the two directions of one relay.
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);

    /// Called once before relaying (TCP: no Nagle delay).
    fn prepare(&self) {}

    /// Makes closing this socket a reset where the transport has one (TCP:
    /// SO_LINGER 0 sends an RST), so the peer sees the reset that happened
    /// on the other side.
    fn abort_on_close(&self) {}
}

impl ClientSocket for TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }

    fn prepare(&self) {
        let _ = self.set_nodelay(true);
    }

    fn abort_on_close(&self) {
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

/// A Unix socket has no reset: the peer of an aborted relay sees EOF.
impl ClientSocket for tokio::net::UnixStream {
    type Read<'a> = tokio::net::unix::ReadHalf<'a>;
    type Write<'a> = tokio::net::unix::WriteHalf<'a>;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

/// An in-process pipe for relaying to a local peer instead of a socket:
/// the server's plain-HTTP forwarding runs hyper's client on the
/// [`PipePeer`] and the relay on the [`PipeEnd`], so a forwarded response
/// has the stall credit, the stall reset and the idle timeout a CONNECT
/// tunnel has. `max_buf`: what the pipe holds each way.
pub fn pipe(max_buf: usize) -> (PipePeer, PipeEnd) {
    let (peer, end) = tokio::io::duplex(max_buf);
    let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (
        PipePeer {
            pipe: peer,
            aborted: aborted.clone(),
        },
        PipeEnd { pipe: end, aborted },
    )
}

/// The relay's end of a [`pipe`]. Both halves go through
/// `tokio::io::split`'s flag, polled from the relay's one task.
pub struct PipeEnd {
    pipe: tokio::io::DuplexStream,
    aborted: Arc<std::sync::atomic::AtomicBool>,
}

impl ClientSocket for PipeEnd {
    type Read<'a> = tokio::io::ReadHalf<&'a mut tokio::io::DuplexStream>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut tokio::io::DuplexStream>;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(&mut self.pipe)
    }

    /// A pipe has no reset of its own: the flag makes the peer's end of
    /// the bytes an error, as a TCP reset is.
    fn abort_on_close(&self) {
        self.aborted
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The local peer's end of a [`pipe`]: the relayed bytes, then EOF, or,
/// when the relay ended in a reset, `ConnectionReset` where EOF would be:
/// a response without a length must not look complete when it was cut.
pub struct PipePeer {
    pipe: tokio::io::DuplexStream,
    aborted: Arc<std::sync::atomic::AtomicBool>,
}

impl PipePeer {
    fn reset_error() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the tunneled connection was reset",
        )
    }
}

impl AsyncRead for PipePeer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.pipe).poll_read(cx, buf))?;
        let eof = buf.filled().len() == before && buf.remaining() > 0;
        if eof && self.aborted.load(std::sync::atomic::Ordering::Acquire) {
            return Poll::Ready(Err(Self::reset_error()));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PipePeer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.pipe).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }
}

/// A TLS client (the mTLS CONNECT ingress). A TLS session cannot be
/// split into independent halves, so both directions go through
/// `tokio::io::split`'s flag; the relay polls both from one task, so the
/// flag is never contended. Half-close sends `close_notify` and a FIN;
/// a reset is a TCP reset under the session.
impl ClientSocket for tokio_rustls::server::TlsStream<TcpStream> {
    type Read<'a> = tokio::io::ReadHalf<&'a mut Self>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut Self>;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(self)
    }

    fn prepare(&self) {
        let _ = self.get_ref().0.set_nodelay(true);
    }

    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close();
    }
}

/// Relays until both directions are done or one side resets.
///
/// `on_bytes` is called after every chunk moved (keep it cheap: a counter).
pub async fn relay<C, S, R, F>(
    tcp: C,
    mut send: S,
    mut recv: R,
    on_bytes: F,
    limits: RelayLimits<'_>,
) -> RelayStats
where
    C: ClientSocket,
    S: TunnelSend,
    R: TunnelRecv,
    F: Fn(Direction, usize),
{
    tcp.prepare();
    let mut tcp = tcp;
    let stopped = async {
        match limits.stop {
            Some(stop) => stop.stopped().await,
            None => std::future::pending().await,
        }
    };
    let mut up = Tally::default();
    let mut down = Tally::default();
    let activity = Activity::new();
    let watched = limits.idle_after.map(|_| &activity);
    let result = {
        let (mut tcp_r, mut tcp_w) = tcp.halves();
        let upstream = copy_up(&mut tcp_r, &mut send, &mut up, &on_bytes, watched, &limits);
        let downstream = copy_down(
            &mut recv, &mut tcp_w, &mut down, &on_bytes, watched, &limits,
        );
        let idle = activity.idle(limits.idle_after);
        tokio::pin!(upstream, downstream, idle, stopped);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            if up_done && down_done {
                break Ok(());
            }
            tokio::select! {
                r = &mut upstream, if !up_done => {
                    up_done = true;
                    if let Err(e) = r { break Err(e); }
                    if let Some(p) = limits.progress {
                        p.finished(Direction::TcpToTunnel);
                    }
                }
                r = &mut downstream, if !down_done => {
                    down_done = true;
                    if let Err(e) = r { break Err(e); }
                    if let Some(p) = limits.progress {
                        p.finished(Direction::TunnelToTcp);
                    }
                }
                e = &mut idle => break Err(e),
                () = &mut stopped => break Err(Failure::Stopped),
            }
        }
    };
    let outcome = match result {
        Ok(()) => {
            // Stay until the peer has our FIN, so a connection closed right
            // after (agent drain) does not turn it into a reset. Bounded.
            let _ = tokio::time::timeout(DELIVERY_WAIT, send.delivered()).await;
            RelayOutcome::Closed
        }
        Err(Failure::Tcp(e)) if e.get_ref().is_some_and(|i| i.is::<ReaderGone>()) => {
            let unlent = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<ReaderGone>())
                .is_some_and(|g| g.unlent);
            tracing::debug!(error = %e, "resetting both sides");
            send.reset(code::CANCELLED);
            recv.stop(code::CANCELLED);
            tcp.abort_on_close();
            RelayOutcome::ReaderGone { unlent }
        }
        Err(Failure::Idle(after)) => {
            tracing::debug!(?after, "idle; resetting both sides");
            send.reset(code::CANCELLED);
            recv.stop(code::CANCELLED);
            tcp.abort_on_close();
            RelayOutcome::Idle
        }
        Err(Failure::Stopped) => {
            tracing::debug!("stopped from outside; resetting both sides");
            send.reset(code::CANCELLED);
            recv.stop(code::CANCELLED);
            tcp.abort_on_close();
            RelayOutcome::Stopped
        }
        Err(Failure::Tcp(e)) => {
            tracing::debug!(error = %e, "TCP side of the relay failed; resetting the stream");
            let c = if is_reset(&e) {
                code::TCP_RESET
            } else {
                code::IO_ERROR
            };
            send.reset(c);
            recv.stop(c);
            RelayOutcome::TcpReset
        }
        Err(Failure::Tunnel(e)) => {
            tracing::debug!(error = %e, "tunnel side of the relay failed; resetting TCP");
            send.reset(code::CANCELLED);
            recv.stop(code::CANCELLED);
            // Linger 0: close() sends an RST instead of a FIN, so the TCP
            // peer sees the reset that happened on the other side.
            tcp.abort_on_close();
            RelayOutcome::TunnelReset
        }
    };
    RelayStats {
        outcome,
        tcp_to_tunnel: up.bytes,
        tunnel_to_tcp: down.bytes,
        opening: up.opening,
    }
}

impl Direction {
    /// Blames an error on the side it came from: reads fail on the source
    /// side of this direction, writes on the destination side.
    fn failure(self, reading: bool, e: io::Error) -> Failure {
        match (self, reading) {
            (Direction::TcpToTunnel, true) | (Direction::TunnelToTcp, false) => Failure::Tcp(e),
            _ => Failure::Tunnel(e),
        }
    }
}

/// TCP → tunnel: reads into a [`ChunkBuf`] and hands the chunks over,
/// behind the [`Opening`] if there is one.
async fn copy_up<Rd, Wr, F>(
    r: &mut Rd,
    w: &mut Wr,
    tally: &mut Tally,
    on_bytes: &F,
    activity: Option<&Activity>,
    limits: &RelayLimits<'_>,
) -> Result<(), Failure>
where
    Rd: AsyncRead + Unpin + ?Sized,
    Wr: TunnelSend + ?Sized,
    F: Fn(Direction, usize),
{
    let dir = Direction::TcpToTunnel;
    let read_fail = |e| dir.failure(true, e);
    let write_fail = |e| dir.failure(false, e);
    let mut buf = ChunkBuf::new(limits.buffers);
    let mut ranking = Ranking::new(limits.order, w);
    if let Some(opening) = limits.opening {
        // The frame goes first in the slab and the first bytes are read
        // behind it, so one chunk (one STREAM frame, one packet) carries
        // both. A read cut short by the hold loses nothing (TCP reads are
        // cancel-safe); the frame then goes alone.
        let (mut n, mut eof) = (0, false);
        if opening.frame.len() <= MIN_BUF / 2 {
            buf.slab.extend_from_slice(opening.frame);
            let room = MIN_BUF - opening.frame.len();
            let mut behind = (&mut buf.slab).limit(room);
            match tokio::time::timeout(opening.hold, r.read_buf(&mut behind)).await {
                Ok(Ok(read)) => (n, eof) = (read, read == 0),
                Ok(Err(e)) => return Err(read_fail(e)),
                Err(_) => {}
            }
            ranking.sending(w, n);
            write_chunk(w, buf.take()).await
        } else {
            write_chunk(w, Bytes::copy_from_slice(opening.frame)).await
        }
        .map_err(write_fail)?;
        tally.opening = Some(if eof {
            OpeningSent::BeforeEof
        } else if n > 0 {
            OpeningSent::WithData
        } else {
            OpeningSent::Alone
        });
        if let Some(a) = activity {
            a.touch();
        }
        if eof {
            return w.shutdown().await.map_err(write_fail);
        }
        if n > 0 {
            tally.bytes += n as u64;
            on_bytes(dir, n);
        }
    }
    loop {
        let n = buf.read(r).await.map_err(read_fail)?;
        if let Some(a) = activity {
            a.touch();
        }
        if n == 0 {
            // FIN: pass the half-close on and stop this direction.
            return w.shutdown().await.map_err(write_fail);
        }
        ranking.sending(w, n);
        write_chunk(w, buf.take()).await.map_err(write_fail)?;
        if let Some(a) = activity {
            a.touch();
        }
        tally.bytes += n as u64;
        on_bytes(dir, n);
        if n == buf.grant.size {
            buf.grant.grow();
        }
    }
}

/// Tunnel → TCP: reads the stream into a [`RelayBuf`] and writes it to the
/// socket, watching for a reader that stopped (the stall credit and
/// [`RelayLimits::reader_gone_after`]).
async fn copy_down<Rd, Wr, F>(
    r: &mut Rd,
    w: &mut Wr,
    tally: &mut Tally,
    on_bytes: &F,
    activity: Option<&Activity>,
    limits: &RelayLimits<'_>,
) -> Result<(), Failure>
where
    Rd: AsyncRead + Unpin + ?Sized,
    Wr: AsyncWrite + Unpin + ?Sized,
    F: Fn(Direction, usize),
{
    let dir = Direction::TunnelToTcp;
    let read_fail = |e| dir.failure(true, e);
    let write_fail = |e| dir.failure(false, e);
    let mut buf = RelayBuf::new(limits.buffers);
    // Credit lent once this direction stalled; kept until the relay ends.
    let mut stalled = None;
    loop {
        let n = r.read(&mut buf.data).await.map_err(read_fail)?;
        if let Some(a) = activity {
            a.touch();
        }
        if n == 0 {
            // FIN: pass the half-close on and stop this direction.
            return w.shutdown().await.map_err(write_fail);
        }
        let watch = if stalled.is_none() {
            limits.stall
        } else {
            None
        };
        write_watching(w, &buf.data[..n], watch, &mut stalled, limits)
            .await
            .map_err(write_fail)?;
        if let Some(a) = activity {
            a.touch();
        }
        tally.bytes += n as u64;
        on_bytes(dir, n);
        if n == buf.data.len() {
            buf.grow();
        }
    }
}

/// `write_all`; if it stays blocked for [`STALL_AFTER`], the stream is
/// stalled and `stalled` gets the credit `stall` lends it; if it stays
/// blocked for `reader_gone_after` (`unlent_gone_after` when nothing could
/// be lent), it fails with [`ReaderGone`]. Timers are armed only for a
/// write that did not complete at once, so a flowing relay arms none.
async fn write_watching<W>(
    w: &mut W,
    data: &[u8],
    stall: Option<&ReceiveWindow>,
    stalled: &mut Option<StallGuard>,
    limits: &RelayLimits<'_>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let write = w.write_all(data);
    tokio::pin!(write);
    let mut give_up = limits.reader_gone_after;
    if stall.is_none() && give_up.is_none() {
        return write.await;
    }
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    if let Poll::Ready(r) = first {
        return r;
    }
    let blocked = tokio::time::Instant::now();
    let mut unlent = false;
    if let Some(stall) = stall {
        tokio::select! {
            biased;
            r = &mut write => return r,
            _ = tokio::time::sleep(STALL_AFTER) => {
                // Past a limit nothing is lent; the next blocked write asks
                // again, in case credit came back meanwhile.
                let guard = stall.stall(limits.client);
                if guard.is_lent() {
                    *stalled = Some(guard);
                } else if let Some(shed) = limits.unlent_gone_after {
                    unlent = true;
                    give_up = Some(give_up.map_or(shed, |g| g.min(shed)));
                }
            }
        }
    }
    match give_up {
        None => write.await,
        Some(after) => match tokio::time::timeout_at(blocked + after, write).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                ReaderGone { after, unlent },
            )),
        },
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Recorded, Recorder, Recv};
    use tokio::net::TcpListener;

    /// The relay's socket and the target at its other end.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dial = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dial, listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    /// Runs a relay whose send half records its writes, opening with
    /// `frame`; returns the recorder, the writer of what the tunnel
    /// delivers, the target and the relay.
    async fn opening_relay(
        frame: &'static [u8],
        hold: Duration,
    ) -> (
        Recorder,
        tokio::io::DuplexStream,
        TcpStream,
        tokio::task::JoinHandle<RelayStats>,
    ) {
        recorded_relay(Some(Opening { frame, hold }), StreamOrder::default()).await
    }

    /// [`opening_relay`], with or without an opening.
    async fn recorded_relay(
        opening: Option<Opening<'static>>,
        order: StreamOrder,
    ) -> (
        Recorder,
        tokio::io::DuplexStream,
        TcpStream,
        tokio::task::JoinHandle<RelayStats>,
    ) {
        watched_relay(opening, order, None, None).await
    }

    /// [`recorded_relay`] that records its directions' ends in `progress`,
    /// and is stopped when `stop` fires.
    async fn watched_relay(
        opening: Option<Opening<'static>>,
        order: StreamOrder,
        progress: Option<std::sync::Arc<RelayProgress>>,
        stop: Option<Arc<StopSignal>>,
    ) -> (
        Recorder,
        tokio::io::DuplexStream,
        TcpStream,
        tokio::task::JoinHandle<RelayStats>,
    ) {
        let (socket, target) = tcp_pair().await;
        let (from_server, recv) = tokio::io::duplex(1024);
        let recorder = Recorder::default();
        let send = recorder.clone();
        let relay = tokio::spawn(async move {
            let budget = BufferBudget::default();
            let limits = RelayLimits {
                stall: None,
                client: None,
                buffers: &budget,
                reader_gone_after: None,
                unlent_gone_after: None,
                idle_after: None,
                opening,
                order,
                progress: progress.as_deref(),
                stop: stop.as_deref(),
            };
            relay(socket, send, Recv(recv), |_, _| {}, limits).await
        });
        (recorder, from_server, target, relay)
    }

    const FRAME: &[u8] = b"FRAME";
    /// Bounds a test that would otherwise hang; never a timing assertion.
    const HANG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn the_opening_travels_in_one_write_with_the_first_bytes() {
        // The hold is far longer than the test: only the target's bytes
        // can release the frame, and they come only after the other
        // direction delivered the client's request during the hold.
        let (recorder, mut from_server, mut target, relay) =
            opening_relay(FRAME, Duration::from_secs(3600)).await;
        tokio::time::timeout(HANG, async {
            from_server.write_all(b"ping").await.unwrap();
            drop(from_server);
            let mut request = Vec::new();
            target.read_to_end(&mut request).await.unwrap();
            assert_eq!(request, b"ping");
            target.write_all(b"pong").await.unwrap();
            drop(target);
            let stats = relay.await.unwrap();
            assert_eq!(stats.outcome, RelayOutcome::Closed);
            assert_eq!((stats.tcp_to_tunnel, stats.tunnel_to_tcp), (4, 4));
            assert_eq!(stats.opening, Some(OpeningSent::WithData));
        })
        .await
        .expect("the relay ends");
        let seen = recorder.seen.lock().unwrap();
        assert_eq!(seen.writes, [b"FRAMEpong".to_vec()]);
        assert!(seen.finished);
    }

    #[tokio::test]
    async fn the_opening_goes_alone_when_the_target_is_silent_past_the_hold() {
        let (recorder, from_server, mut target, relay) =
            opening_relay(FRAME, Duration::from_millis(20)).await;
        tokio::time::timeout(HANG, async {
            recorder.until(|r| !r.writes.is_empty()).await;
            target.write_all(b"late").await.unwrap();
            drop(target);
            drop(from_server);
            assert_eq!(relay.await.unwrap().opening, Some(OpeningSent::Alone));
        })
        .await
        .expect("the relay ends");
        let seen = recorder.seen.lock().unwrap();
        assert_eq!(seen.writes, [FRAME.to_vec(), b"late".to_vec()]);
        assert!(seen.finished);
    }

    #[tokio::test]
    async fn the_opening_goes_before_the_fin_of_a_target_that_says_nothing() {
        let (recorder, from_server, target, relay) =
            opening_relay(FRAME, Duration::from_secs(3600)).await;
        tokio::time::timeout(HANG, async {
            drop(target);
            recorder.until(|r| r.finished).await;
            drop(from_server);
            assert_eq!(relay.await.unwrap().opening, Some(OpeningSent::BeforeEof));
        })
        .await
        .expect("the relay ends");
        assert_eq!(recorder.seen.lock().unwrap().writes, [FRAME.to_vec()]);
    }

    #[tokio::test]
    async fn progress_names_the_direction_that_passed_its_fin_on() {
        let progress = std::sync::Arc::new(RelayProgress::default());
        let (recorder, mut from_server, mut target, relay) =
            watched_relay(None, StreamOrder::default(), Some(progress.clone()), None).await;
        let (up, down) = (Direction::TcpToTunnel, Direction::TunnelToTcp);
        tokio::time::timeout(HANG, async {
            // The target half-closes: its FIN goes into the tunnel, and
            // the other direction stays open.
            target.shutdown().await.unwrap();
            recorder.until(|r| r.finished).await;
            while !progress.is_finished(up) {
                tokio::task::yield_now().await;
            }
            assert!(!progress.is_finished(down));
            // The server's bytes still reach the target, then its FIN.
            from_server.write_all(b"late").await.unwrap();
            drop(from_server);
            let mut got = Vec::new();
            target.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"late");
            assert_eq!(relay.await.unwrap().outcome, RelayOutcome::Closed);
        })
        .await
        .expect("the relay ends");
        assert!(progress.is_finished(up) && progress.is_finished(down));
        assert_eq!(
            progress.describe("target"),
            "target to tunnel finished, tunnel to target finished"
        );
        assert_eq!(
            RelayProgress::default().describe("client"),
            "client to tunnel open, tunnel to client open"
        );
    }

    /// A relay whose `stop` completes resets both sides at once, in the
    /// middle of a flowing exchange (a revoked client's tunnel).
    #[tokio::test]
    async fn a_stop_resets_both_sides_of_a_live_relay() {
        let stop = Arc::new(StopSignal::default());
        let (recorder, mut from_server, mut target, relay) =
            watched_relay(None, StreamOrder::default(), None, Some(stop.clone())).await;
        tokio::time::timeout(HANG, async {
            // Both directions flow first.
            from_server.write_all(b"down").await.unwrap();
            let mut got = [0; 4];
            target.read_exact(&mut got).await.unwrap();
            target.write_all(b"up").await.unwrap();
            recorder.until(|r| r.writes.concat() == b"up").await;
            stop.stop();
            assert_eq!(relay.await.unwrap().outcome, RelayOutcome::Stopped);
            let mut rest = Vec::new();
            let read = target.read_to_end(&mut rest).await;
            assert_eq!(
                read.map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionReset),
                "the target saw a reset, not a FIN"
            );
        })
        .await
        .expect("the relay ends");
        let seen = recorder.seen.lock().unwrap();
        assert_eq!(seen.reset, Some(code::CANCELLED));
        assert!(!seen.finished, "the tunnel side was reset, not finished");
    }

    #[tokio::test]
    async fn an_opening_too_long_to_share_the_buffer_goes_alone_at_once() {
        static LONG: [u8; MIN_BUF / 2 + 1] = [b'F'; MIN_BUF / 2 + 1];
        let (recorder, from_server, mut target, relay) =
            opening_relay(&LONG, Duration::from_secs(3600)).await;
        tokio::time::timeout(HANG, async {
            // Not held: it is written while the target says nothing.
            recorder.until(|r| !r.writes.is_empty()).await;
            target.write_all(b"pong").await.unwrap();
            drop(target);
            drop(from_server);
            assert_eq!(relay.await.unwrap().opening, Some(OpeningSent::Alone));
        })
        .await
        .expect("the relay ends");
        let seen = recorder.seen.lock().unwrap();
        assert_eq!(seen.writes, [LONG.to_vec(), b"pong".to_vec()]);
    }

    /// Where a chunk starts, to tell a handed-over chunk from a copy.
    fn at(chunk: &Bytes) -> usize {
        chunk.as_ptr() as usize
    }

    #[tokio::test]
    async fn large_reads_and_the_tail_behind_them_are_handed_over_without_a_copy() {
        let (recorder, from_server, mut target, relay) =
            recorded_relay(None, StreamOrder::default()).await;
        let large = vec![7u8; MIN_BUF / 2];
        tokio::time::timeout(HANG, async {
            for (i, data) in [&large[..], b"tail"].into_iter().enumerate() {
                target.write_all(data).await.unwrap();
                recorder.until(|r| r.chunks.len() > i).await;
            }
            drop(target);
            drop(from_server);
            assert_eq!(relay.await.unwrap().outcome, RelayOutcome::Closed);
        })
        .await
        .expect("the relay ends");
        let seen = recorder.seen.lock().unwrap();
        assert_eq!(seen.writes, [&large[..], b"tail"]);
        // The transport still holds the first chunk, and the second read
        // landed right behind it in the same slab: both handed over.
        assert_eq!(at(&seen.chunks[1]), at(&seen.chunks[0]) + large.len());
    }

    /// Relays `len` bytes from the target into a recording send half.
    async fn relay_from_target(len: usize, order: StreamOrder) -> Recorded {
        let (recorder, from_server, mut target, relay) = recorded_relay(None, order).await;
        tokio::time::timeout(HANG, async {
            target.write_all(&vec![1u8; len]).await.unwrap();
            drop(target);
            recorder.until(|r| r.finished).await;
            drop(from_server);
            assert_eq!(relay.await.unwrap().outcome, RelayOutcome::Closed);
        })
        .await
        .expect("the relay ends");
        let seen = std::mem::take(&mut *recorder.seen.lock().unwrap());
        seen
    }

    #[tokio::test]
    async fn a_least_served_stream_drops_its_priority_as_it_sends() {
        let seen = relay_from_target(1 << 20, StreamOrder::LeastServed).await;
        assert_eq!(seen.writes.iter().map(Vec::len).sum::<usize>(), 1 << 20);
        let (p, before): (Vec<i32>, Vec<usize>) = seen.priorities.iter().copied().unzip();
        // Each priority is minus (level × SLOTS + the stream's slot).
        let slot = -p[0];
        assert!((0..SLOTS).contains(&slot), "{p:?}");
        assert!(p.iter().all(|p| -p % SLOTS == slot), "{p:?}");
        let levels: Vec<i32> = p.iter().map(|p| -p / SLOTS).collect();
        // Set when the stream starts, at level 0. No write is larger than
        // a quantum, so the next step is to level 1; 16 quanta sent within
        // far less than a half-life go well below.
        assert_eq!(levels[..2], [0, 1], "{p:?}");
        assert!(levels.iter().max().unwrap() >= &8, "{p:?}");
        // Each is set before the write it counts goes out, so that write
        // queues at it: the step to level 1 comes before the write that
        // crosses a quantum, not after.
        assert_eq!(before[0], 0);
        assert!(before[1] < SERVICE_QUANTUM, "{before:?}");
        // Set only when it changes: at most once per quantum sent.
        assert!(p.len() <= 17, "{p:?}");
        assert!(p.windows(2).all(|w| w[0] != w[1]), "{p:?}");
    }

    #[tokio::test]
    async fn a_round_robin_stream_keeps_its_priority() {
        let seen = relay_from_target(1 << 20, StreamOrder::RoundRobin).await;
        assert_eq!(seen.writes.iter().map(Vec::len).sum::<usize>(), 1 << 20);
        assert!(seen.priorities.is_empty(), "{:?}", seen.priorities);
    }

    #[test]
    fn recent_service_steps_down_per_quantum_and_wears_off() {
        let t0 = Instant::now();
        let level = |l: i32| -(l * SLOTS + 7);
        let mut s = RecentService::new(t0, 7);
        assert_eq!(s.priority, level(0));
        assert_eq!(s.sent(t0, SERVICE_QUANTUM - 1), None);
        assert_eq!(s.sent(t0, 1), Some(level(1)));
        assert_eq!(s.sent(t0, 3 * SERVICE_QUANTUM), Some(level(4)));
        assert_eq!(s.sent(t0, 0), None);
        // A half-life later what it sent counts half.
        assert_eq!(s.sent(t0 + SERVICE_HALF_LIFE, 0), Some(level(2)));
        // Idle for ten more, it is back at the top.
        assert_eq!(s.sent(t0 + SERVICE_HALF_LIFE * 11, 0), Some(level(0)));
        // A clock that went backwards counts as no time passing.
        assert_eq!(s.sent(t0, SERVICE_QUANTUM), Some(level(1)));
        // Levels past what a priority holds saturate instead of wrapping.
        assert_eq!(s.sent(t0, usize::MAX), Some(-(MAX_LEVEL * SLOTS + 7)));
    }

    #[test]
    fn an_interactive_stream_stays_above_a_transfer() {
        // A keystroke's echo of 100 bytes every 10 ms for a minute: ~2.5
        // KiB lately at any time, far below a quantum.
        let t0 = Instant::now();
        let mut keys = RecentService::new(t0, SLOTS - 1);
        for i in 1..=6000u32 {
            assert_eq!(keys.sent(t0 + Duration::from_millis(10) * i, 100), None);
        }
        // A saturating transfer (1 GB/s) that started before it, with the
        // best slot, sinks below it with its first quantum.
        let mut bulk = RecentService::new(t0, 0);
        assert!(bulk.priority > keys.priority);
        let mut priority = bulk.priority;
        for i in 1..=16u32 {
            if let Some(p) = bulk.sent(t0 + Duration::from_micros(64) * i, SERVICE_QUANTUM) {
                assert!(p < keys.priority);
                priority = p;
            }
        }
        assert_eq!(priority, -15 * SLOTS);
    }

    #[tokio::test]
    async fn a_small_read_is_copied_out_and_its_slab_read_into_again() {
        let budget = BufferBudget::default();
        let mut buf = ChunkBuf::new(&budget);
        buf.read(&mut &b"hello"[..]).await.unwrap();
        let slab = buf.slab.as_ptr() as usize;
        let chunk = buf.take();
        assert_eq!(&chunk[..], b"hello");
        assert_ne!(at(&chunk), slab, "copied: the chunk pins no slab");
        buf.read(&mut &b"again"[..]).await.unwrap();
        assert_eq!(
            buf.slab.as_ptr() as usize,
            slab,
            "the slab is reused at once"
        );
    }

    #[tokio::test]
    async fn a_shared_slab_is_read_into_again_once_its_chunks_are_gone() {
        let budget = BufferBudget::default();
        let mut buf = ChunkBuf::new(&budget);
        let data = vec![1u8; MIN_BUF];
        buf.read(&mut &data[..MIN_BUF / 2]).await.unwrap();
        let first = buf.take();
        let start = at(&first);
        drop(first);
        buf.read(&mut &data[..]).await.unwrap();
        assert_eq!(at(&buf.take()), start, "the same memory, no allocation");
    }

    #[tokio::test]
    async fn a_pinned_slab_is_filled_to_its_tail_then_replaced() {
        let budget = BufferBudget::default();
        let mut buf = ChunkBuf::new(&budget);
        let data = vec![1u8; MIN_BUF];
        // Pinned chunks: the transport has not let go of them.
        let head = MIN_BUF - 2 * SLAB_TAIL;
        buf.read(&mut &data[..head]).await.unwrap();
        let a = buf.take();
        // Room for a tail's worth or more: a read, small or not, lands
        // behind `a` and goes without a copy.
        assert_eq!(buf.read(&mut &data[..5]).await.unwrap(), 5);
        let b = buf.take();
        assert_eq!(at(&b), at(&a) + head);
        assert_eq!(buf.read(&mut &data[..]).await.unwrap(), 2 * SLAB_TAIL - 5);
        let c = buf.take();
        assert_eq!(at(&c), at(&b) + 5);
        // Used up and pinned: a new slab of the full read size.
        assert_eq!(buf.read(&mut &data[..]).await.unwrap(), MIN_BUF);
        let d = buf.take();
        assert!(at(&d) < at(&a) || at(&d) >= at(&a) + MIN_BUF);
    }

    #[test]
    fn buffer_growth_is_bounded_by_the_budget_and_given_back() {
        let budget = BufferBudget::default();
        let mut bufs = Vec::new();
        // Grow buffers to the largest size until the budget refuses one.
        loop {
            let mut b = RelayBuf::new(&budget);
            for _ in 0..8 {
                b.grow();
            }
            assert!(b.data.len() <= MAX_BUF);
            let full = b.data.len() == MAX_BUF;
            bufs.push(b);
            if !full {
                break;
            }
            assert!(
                bufs.len() <= GROWTH_BUDGET / (MAX_BUF - MIN_BUF) + 1,
                "grew past the budget"
            );
        }
        assert!(budget.grown() <= GROWTH_BUDGET);
        assert!(budget.refused() >= 1, "the refusal is counted");
        // The one over budget still relays, with the buffer it has.
        assert!(bufs.last().unwrap().data.len() >= MIN_BUF);
        drop(bufs);
        assert_eq!(budget.grown(), 0);
    }

    #[test]
    fn a_refused_buffer_asks_again_only_after_many_full_reads() {
        let budget = BufferBudget::new(0);
        let mut b = RelayBuf::new(&budget);
        b.grow();
        assert_eq!(budget.refused(), 1);
        for _ in 0..ASK_AGAIN_AFTER {
            b.grow();
        }
        assert_eq!(budget.refused(), 1, "held back, the budget is not asked");
        b.grow();
        assert_eq!(budget.refused(), 2);
        assert_eq!(b.data.len(), MIN_BUF);
    }
}
