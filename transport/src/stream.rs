//! The transport-neutral stream halves.
//!
//! A tunneled connection is a send half and a receive half. Reads and
//! writes are plain `AsyncRead` / `AsyncWrite`; a peer's reset shows up as
//! an `io::ErrorKind::ConnectionReset` error. What TCP cannot express
//! through those traits — aborting a direction with a reason — is here.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite};

/// A future the relay awaits once per stream, not per chunk.
pub type Delivered = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// How a QUIC connection orders the queued data of its streams. HTTP/2
/// (the h2 crate) interleaves its streams frame by frame whatever this
/// says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamOrder {
    /// The stream served least lately goes first: the relay lowers a
    /// stream's send priority a level per [`crate::relay::SERVICE_QUANTUM`]
    /// it sends, the drop wearing off with a
    /// [`crate::relay::SERVICE_HALF_LIFE`] half-life, and orders streams of
    /// one level by a slot each drew when it started. A `kubectl exec`
    /// keystroke or a new scrape goes ahead of a long transfer's queued
    /// data at the next packet; streams of one level go one after the
    /// other in runs of about a quantum, not packet by packet. A
    /// 1,000-stream echo took 25-31% less CPU (medians) at both ends than with
    /// round robin, its receivers writing runs instead of one packet's
    /// worth per wake-up (`benches/RESULTS.md`).
    #[default]
    LeastServed,
    /// quinn's default: streams with data take turns packet by packet.
    RoundRobin,
}

impl std::str::FromStr for StreamOrder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "least-served" => Ok(StreamOrder::LeastServed),
            "round-robin" => Ok(StreamOrder::RoundRobin),
            other => Err(format!(
                "{other:?} is not a stream order: least-served or round-robin"
            )),
        }
    }
}

/// The send priority of control streams: above every tunneled stream
/// (never above 0), so a `GoAway` or a stream grant never waits behind
/// relayed data.
pub const CONTROL_PRIORITY: i32 = 1;

/// Puts a QUIC control stream at [`CONTROL_PRIORITY`]; each end calls it
/// on the control stream it opens (agent) or accepts (server).
pub fn mark_control(send: &quinn::SendStream) {
    // Err only for a stream already finished or reset: nothing to order.
    let _ = send.set_priority(CONTROL_PRIORITY);
}

/// Sending half of a tunneled stream. `poll_shutdown` is a clean FIN.
pub trait TunnelSend: AsyncWrite + Unpin + Send {
    /// Abandons the stream with `code` (a `proto::codes::stream` value); the
    /// peer's reads fail with a reset.
    fn reset(&mut self, code: u32);

    /// Completes once the peer has acknowledged everything sent, FIN
    /// included (or the stream or connection ended). Closing a connection
    /// before this would turn a clean FIN into a reset at the other end.
    fn delivered(&self) -> Delivered;

    /// Writes a prefix of `chunk` (at least one byte, or an error) and
    /// advances `chunk` past it. Transports that keep owned buffers (quinn,
    /// h2) take the chunk itself where `poll_write` would copy it, so the
    /// relay reads TCP data into shared buffers and hands them over. The
    /// default writes through `poll_write`.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut *self).poll_write(cx, chunk))?;
        if n == 0 && !chunk.is_empty() {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        chunk.advance(n);
        Poll::Ready(Ok(()))
    }

    /// Where this stream's queued data goes among its connection's
    /// streams: higher first ([`StreamOrder::LeastServed`]). Transports
    /// without send priorities (HTTP/2) ignore it.
    fn set_priority(&mut self, _priority: i32) {}
}

/// Writes all of `chunk` through [`TunnelSend::poll_write_chunk`].
pub async fn write_chunk<S: TunnelSend + ?Sized>(send: &mut S, mut chunk: Bytes) -> io::Result<()> {
    while !chunk.is_empty() {
        std::future::poll_fn(|cx| send.poll_write_chunk(cx, &mut chunk)).await?;
    }
    Ok(())
}

/// Receiving half of a tunneled stream. EOF is the peer's FIN.
pub trait TunnelRecv: AsyncRead + Unpin + Send {
    /// Tells the peer we will read no more (`code` says why); its writes fail.
    fn stop(&mut self, code: u32);
}

/// A QUIC stream's send half, as relays and dials use it.
///
/// It works around a lost wake-up in quinn (0.11.19): a write to a stream
/// the peer has stopped (`STOP_SENDING`) returns `Blocked`, not `Stopped`,
/// while the connection's send window or flow-control credit is used up,
/// and quinn puts the stream on its list of streams waiting for connection
/// credit. When that credit comes back, quinn wakes only those of them
/// that also have stream credit left, and a stopped stream never gets
/// more. Its writer then waits for good: the benchmark found an agent
/// relay whose client had gone holding its target connection and its
/// drain until the grace period ran out. So a write that is still blocked
/// when polled again (quinn wakes a blocked writer when its stream is
/// stopped) asks quinn whether the stream was stopped. A write that
/// blocks once and then proceeds never asks. Asking leaves an entry
/// (~100 bytes) in quinn's per-connection map of `stopped()` waiters,
/// which quinn removes when the stream is stopped or finished, or the
/// connection closes: a stream this side resets after asking keeps its
/// entry until the connection ends.
pub struct QuicSend {
    stream: quinn::SendStream,
    /// The last write was blocked.
    blocked: bool,
}

impl QuicSend {
    pub fn new(stream: quinn::SendStream) -> Self {
        QuicSend {
            stream,
            blocked: false,
        }
    }

    /// The stream's id within its connection.
    pub fn id(&self) -> quinn::StreamId {
        self.stream.id()
    }

    /// A blocked write: the second in a row fails if the peer stopped
    /// the stream (or the connection is gone).
    fn blocked<T>(&mut self) -> Poll<io::Result<T>> {
        if std::mem::replace(&mut self.blocked, true) {
            if let Some(e) = stopped_now(&self.stream) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Pending
    }

    fn wrote<T>(&mut self, r: io::Result<T>) -> Poll<io::Result<T>> {
        self.blocked = false;
        Poll::Ready(r)
    }
}

/// Why writes to `stream` can no longer succeed, if the peer stopped it
/// or the connection is gone; `None` while it may still become writable.
/// Polls quinn's `stopped` future once without waiting on it.
fn stopped_now(stream: &quinn::SendStream) -> Option<io::Error> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(stream.stopped()).poll(&mut cx) {
        Poll::Ready(Ok(Some(code))) => Some(quinn::WriteError::Stopped(code).into()),
        // The stream is gone (its state freed): writes fail anyway.
        Poll::Ready(Ok(None)) => Some(quinn::WriteError::ClosedStream.into()),
        Poll::Ready(Err(e)) => Some(e.into()),
        Poll::Pending => None,
    }
}

impl AsyncWrite for QuicSend {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Ready(r) => self.wrote(r.map_err(io::Error::from)),
            Poll::Pending => self.blocked(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.stream), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.stream), cx)
    }
}

impl TunnelSend for QuicSend {
    fn reset(&mut self, code: u32) {
        // Err only if already finished or reset: nothing left to abandon.
        let _ = self.stream.reset(quinn::VarInt::from_u32(code));
    }

    fn delivered(&self) -> Delivered {
        let stopped = self.stream.stopped();
        Box::pin(async move {
            let _ = stopped.await;
        })
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        // `write_chunks` is cancel-safe (nothing is written unless it
        // completes), so a fresh future per poll is sound, as in quinn's own
        // `poll_write`. It empties what it wrote and leaves the rest.
        let mut chunks = [std::mem::take(chunk)];
        let polled = std::pin::pin!(self.stream.write_chunks(&mut chunks)).poll(cx);
        *chunk = std::mem::take(&mut chunks[0]);
        match polled {
            Poll::Ready(r) => self.wrote(r.map(|_| ()).map_err(io::Error::from)),
            Poll::Pending => self.blocked(),
        }
    }

    fn set_priority(&mut self, priority: i32) {
        // Err only once the stream is finished or reset.
        let _ = self.stream.set_priority(priority);
    }
}

impl TunnelRecv for quinn::RecvStream {
    fn stop(&mut self, code: u32) {
        let _ = quinn::RecvStream::stop(self, quinn::VarInt::from_u32(code));
    }
}

impl<T: TunnelSend + ?Sized> TunnelSend for Box<T> {
    fn reset(&mut self, code: u32) {
        (**self).reset(code)
    }

    fn delivered(&self) -> Delivered {
        (**self).delivered()
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        (**self).poll_write_chunk(cx, chunk)
    }

    fn set_priority(&mut self, priority: i32) {
        (**self).set_priority(priority)
    }
}

impl<T: TunnelRecv + ?Sized> TunnelRecv for Box<T> {
    fn stop(&mut self, code: u32) {
        (**self).stop(code)
    }
}

/// A tunneled stream whose transport is decided at run time.
pub struct TunnelStream {
    pub send: Box<dyn TunnelSend>,
    pub recv: Box<dyn TunnelRecv>,
}

impl TunnelStream {
    pub fn new(send: impl TunnelSend + 'static, recv: impl TunnelRecv + 'static) -> Self {
        TunnelStream {
            send: Box::new(send),
            recv: Box::new(recv),
        }
    }
}
