//! Sending before the dial result: the optimistic open.
//!
//! For transparent connections the server writes `Dial` and starts
//! relaying the client's bytes at once, without waiting for the agent's
//! `DialResult`; the agent reads them once its connect succeeded. That
//! saves one tunnel round trip per new connection (a TLS ClientHello
//! travels with the `Dial`). [`ResultGate`] wraps the receive half: it
//! reads exactly the `DialResult` frame first, bounded by a deadline, and
//! only then lets the target's bytes through; a refusal, a timeout or a
//! malformed frame is a read error, so the relay resets the client.
//!
//! What the client sends before the answer is bounded: [`gate`] pairs the
//! `ResultGate` with a [`HeldSend`] that lets [`OPTIMISTIC_BYTES`] through
//! (a TLS ClientHello, whatever its size) and holds the rest until the
//! gate opens. Unbounded, a burst of new connections whose dials are slow
//! (a target's accept backlog overflowing) would fill the agent
//! connection's receive window with data nobody reads yet, and starve
//! every other stream on it, the `Dial` frames of the next connections
//! included, until their dials time out.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use proto::{DialCode, Message, FRAME_HEADER_LEN, MAX_FRAME_BODY};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stream::{Delivered, TunnelRecv, TunnelSend};

/// What a client may send before the agent's `DialResult` arrives: one
/// TLS record, so a ClientHello travels with the `Dial` as the optimistic
/// open intends.
pub const OPTIMISTIC_BYTES: usize = 16 * 1024;

/// Why the gate did not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateError {
    Refused {
        code: DialCode,
        message: String,
    },
    Timeout,
    /// The agent reset the stream before its answer: the target reset the
    /// connection before sending a byte, while the answer was held for it.
    Reset,
    /// The agent's connection was lost (closed, timed out, or told to go
    /// away) before its answer.
    ConnectionLost,
    Protocol(String),
}

/// Whether a stream's error says its whole connection is gone, rather
/// than the stream or the peer misbehaving: quinn's `ConnectionLost` and
/// `ClosedStream` (`NotConnected`), an HTTP/2 GOAWAY (`ConnectionAborted`).
pub fn is_connection_lost(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted
    )
}

impl GateError {
    /// Stable label for metrics (the same labels as a waited-for dial).
    pub fn label(&self) -> &'static str {
        match self {
            GateError::Refused { code, .. } => code.label(),
            GateError::Timeout => "timeout",
            GateError::Reset => "reset",
            GateError::ConnectionLost => "connection_lost",
            GateError::Protocol(_) => "protocol",
        }
    }
}

/// Told once how the dial went: its duration, or why it failed.
pub type OnResult = Box<dyn FnOnce(Result<Duration, GateError>) + Send>;

/// Reads the `DialResult` first, then passes the stream through.
pub struct ResultGate<R> {
    inner: R,
    /// The frame being read; emptied once the gate is open.
    frame: Vec<u8>,
    open: bool,
    started: Instant,
    deadline: Pin<Box<tokio::time::Sleep>>,
    on_result: Option<OnResult>,
    /// Told when the answer is in (either way), for a [`HeldSend`].
    settled: Option<Arc<Settled>>,
}

/// The gate has its answer: the send half may write freely (or the relay
/// is about to end). Set once; the waker is taken only while held.
#[derive(Default)]
struct Settled {
    done: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Settled {
    fn is_set(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.done.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The gated halves of an optimistic open: the receive half reads the
/// `DialResult` first, and the send half lets [`OPTIMISTIC_BYTES`] through
/// before it.
pub fn gate<R: TunnelRecv, S: TunnelSend>(
    recv: R,
    send: S,
    bound: Duration,
    on_result: OnResult,
) -> (ResultGate<R>, HeldSend<S>) {
    let settled = Arc::new(Settled::default());
    let mut gate = ResultGate::new(recv, bound, on_result);
    gate.settled = Some(settled.clone());
    let held = HeldSend {
        inner: send,
        allowance: OPTIMISTIC_BYTES,
        settled,
    };
    (gate, held)
}

impl<R: TunnelRecv> ResultGate<R> {
    pub fn new(inner: R, bound: Duration, on_result: OnResult) -> Self {
        ResultGate {
            inner,
            frame: Vec::with_capacity(64),
            open: false,
            started: Instant::now(),
            deadline: Box::pin(tokio::time::sleep(bound)),
            on_result: Some(on_result),
            settled: None,
        }
    }

    fn fail(&mut self, e: GateError) -> io::Error {
        let kind = match e {
            GateError::Timeout => io::ErrorKind::TimedOut,
            GateError::Refused { .. } => io::ErrorKind::ConnectionRefused,
            GateError::Reset => io::ErrorKind::ConnectionReset,
            GateError::ConnectionLost => io::ErrorKind::NotConnected,
            GateError::Protocol(_) => io::ErrorKind::InvalidData,
        };
        let text = format!("dial failed: {e:?}");
        self.settle();
        if let Some(cb) = self.on_result.take() {
            cb(Err(e));
        }
        io::Error::new(kind, text)
    }

    /// Drives the frame read; Ready(Ok) once the gate is open.
    fn poll_result(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let need = if self.frame.len() < FRAME_HEADER_LEN {
                FRAME_HEADER_LEN
            } else {
                let len = u16::from_be_bytes([self.frame[1], self.frame[2]]) as usize;
                if len > MAX_FRAME_BODY {
                    return Poll::Ready(Err(
                        self.fail(GateError::Protocol(format!("frame of {len} bytes")))
                    ));
                }
                let need = FRAME_HEADER_LEN + len;
                if self.frame.len() == need {
                    return Poll::Ready(self.decide());
                }
                need
            };
            if self.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(self.fail(GateError::Timeout)));
            }
            let start = self.frame.len();
            self.frame.resize(need, 0);
            let mut buf = ReadBuf::new(&mut self.frame[start..need]);
            let polled = Pin::new(&mut self.inner).poll_read(cx, &mut buf);
            let got = buf.filled().len();
            self.frame.truncate(start + got);
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Poll::Ready(Err(self.fail(GateError::Reset)));
                }
                Poll::Ready(Err(e)) if is_connection_lost(&e) => {
                    return Poll::Ready(Err(self.fail(GateError::ConnectionLost)));
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(self.fail(GateError::Protocol(e.to_string()))));
                }
                Poll::Ready(Ok(())) if got == 0 => {
                    return Poll::Ready(Err(self.fail(GateError::Protocol(
                        "stream ended before the dial result".into(),
                    ))));
                }
                Poll::Ready(Ok(())) => {}
            }
        }
    }

    fn decide(&mut self) -> io::Result<()> {
        let decoded = proto::decode(&self.frame);
        self.frame = Vec::new();
        match decoded {
            Ok(Some((Message::DialResult(r), _))) if r.code == DialCode::Ok => {
                self.open = true;
                self.settle();
                if let Some(cb) = self.on_result.take() {
                    cb(Ok(self.started.elapsed()));
                }
                Ok(())
            }
            Ok(Some((Message::DialResult(r), _))) => Err(self.fail(GateError::Refused {
                code: r.code,
                message: r.message,
            })),
            Ok(Some((other, _))) => Err(self.fail(GateError::Protocol(format!(
                "expected DialResult, got {}",
                other.kind()
            )))),
            Ok(None) => Err(self.fail(GateError::Protocol("truncated DialResult".into()))),
            Err(e) => Err(self.fail(GateError::Protocol(e.to_string()))),
        }
    }
}

impl<R> ResultGate<R> {
    /// Releases the [`HeldSend`], if any.
    fn settle(&self) {
        if let Some(s) = &self.settled {
            s.set();
        }
    }
}

impl<R> Drop for ResultGate<R> {
    fn drop(&mut self) {
        // A held writer must not wait for an answer nobody will read.
        self.settle();
    }
}

/// The send half of an optimistic open: [`OPTIMISTIC_BYTES`] go out before
/// the gate has the agent's answer, the rest once it has (a refusal ends
/// the relay from the receive side). One atomic load per write after that.
pub struct HeldSend<S> {
    inner: S,
    allowance: usize,
    settled: Arc<Settled>,
}

impl<S> HeldSend<S> {
    /// How much may be written now: `None` for everything (settled), or
    /// the allowance left; `Pending` while it is spent and the answer has
    /// not come.
    fn poll_allowed(&mut self, cx: &mut Context<'_>) -> Poll<Option<usize>> {
        if self.settled.is_set() {
            return Poll::Ready(None);
        }
        if self.allowance == 0 {
            *self.settled.waker.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(cx.waker().clone());
            // Settled between the check and the waker being stored.
            if !self.settled.is_set() {
                return Poll::Pending;
            }
            return Poll::Ready(None);
        }
        Poll::Ready(Some(self.allowance))
    }
}

impl<S: TunnelSend> AsyncWrite for HeldSend<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(allowed) = ready!(this.poll_allowed(cx)) else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        let n = buf.len().min(allowed);
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..n]))?;
        this.allowance -= written;
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: TunnelSend> TunnelSend for HeldSend<S> {
    fn reset(&mut self, code: u32) {
        self.inner.reset(code)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let Some(allowed) = ready!(self.poll_allowed(cx)) else {
            return self.inner.poll_write_chunk(cx, chunk);
        };
        // Only the allowance may go: write a shared prefix of the chunk
        // (no copy) and advance the chunk by what went.
        let n = chunk.len().min(allowed);
        let mut part = chunk.slice(..n);
        ready!(self.inner.poll_write_chunk(cx, &mut part))?;
        let written = n - part.len();
        self.allowance -= written;
        chunk.advance(written);
        Poll::Ready(Ok(()))
    }

    fn delivered(&self) -> Delivered {
        self.inner.delivered()
    }

    fn set_priority(&mut self, priority: i32) {
        self.inner.set_priority(priority)
    }
}

impl<R: TunnelRecv> AsyncRead for ResultGate<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.open {
            ready!(this.poll_result(cx))?;
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<R: TunnelRecv> TunnelRecv for ResultGate<R> {
    fn stop(&mut self, code: u32) {
        self.inner.stop(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Recv, Sink};
    use proto::DialResult;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;

    fn bytes(v: Vec<u8>) -> Recv<std::io::Cursor<Vec<u8>>> {
        Recv(std::io::Cursor::new(v))
    }

    fn wire(result: DialResult, rest: &[u8]) -> Recv<std::io::Cursor<Vec<u8>>> {
        let mut v = Vec::new();
        proto::encode(&Message::DialResult(result), &mut v).unwrap();
        v.extend_from_slice(rest);
        bytes(v)
    }

    type Seen = Arc<Mutex<Option<Result<Duration, GateError>>>>;

    fn recorder() -> (OnResult, Seen) {
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        (Box::new(move |r| *s.lock().unwrap() = Some(r)), seen)
    }

    #[tokio::test]
    async fn passes_bytes_after_an_ok() {
        let (cb, seen) = recorder();
        let mut gate = ResultGate::new(
            wire(DialResult::ok(), b"payload"),
            Duration::from_secs(5),
            cb,
        );
        let mut out = Vec::new();
        gate.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"payload");
        assert!(matches!(*seen.lock().unwrap(), Some(Ok(_))));
    }

    /// Before the answer the client's first 16 KiB go out and the rest
    /// waits; the answer lets it through (a refusal too: the relay then
    /// ends from the receive side). Borrowed writes and owned chunks alike.
    #[tokio::test]
    async fn the_send_half_holds_all_but_the_first_record_until_the_answer() {
        use tokio::io::{AsyncWriteExt, DuplexStream};
        for (answer, chunked) in [
            (DialResult::ok(), false),
            (DialResult::error(DialCode::NotAllowed, "nope"), false),
            (DialResult::ok(), true),
        ] {
            let (agent_writes, agent_reads_answer) = tokio::io::duplex(1 << 20);
            let (sent, mut agent_reads): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
            let (cb, _seen) = recorder();
            let (mut recv, mut send) = gate(
                Recv(agent_reads_answer),
                Sink(sent),
                Duration::from_secs(5),
                cb,
            );
            let data = vec![7u8; 64 * 1024];
            let mut write: Pin<Box<dyn Future<Output = io::Result<()>>>> = if chunked {
                Box::pin(crate::stream::write_chunk(&mut send, Bytes::from(data)))
            } else {
                Box::pin(send.write_all(&data))
            };
            // Nothing answers yet: the write stops after one record.
            assert!(tokio::time::timeout(Duration::from_millis(100), &mut write)
                .await
                .is_err());
            let mut early = vec![0u8; OPTIMISTIC_BYTES + 1];
            let n = agent_reads.read(&mut early).await.unwrap();
            assert_eq!(n, OPTIMISTIC_BYTES);
            // The answer arrives and the gate reads it.
            let mut agent_writes = agent_writes;
            let mut frame = Vec::new();
            proto::encode(&Message::DialResult(answer.clone()), &mut frame).unwrap();
            agent_writes.write_all(&frame).await.unwrap();
            let mut one = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_millis(500), recv.read(&mut one)).await;
            tokio::time::timeout(Duration::from_secs(5), &mut write)
                .await
                .expect("released by the answer")
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_refusal_is_an_error_and_reported() {
        let (cb, seen) = recorder();
        let refused = DialResult::error(DialCode::NotAllowed, "nope");
        let mut gate = ResultGate::new(wire(refused, b"never"), Duration::from_secs(5), cb);
        let err = gate.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            seen.lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .as_ref()
                .unwrap_err()
                .label(),
            "not_allowed"
        );
    }

    /// A reader whose stream failed with `kind`.
    struct FailedRecv(io::ErrorKind);
    impl AsyncRead for FailedRecv {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.0.into()))
        }
    }

    #[tokio::test]
    async fn a_reset_before_the_answer_is_reported_as_a_reset() {
        let (cb, seen) = recorder();
        let reset = Recv(FailedRecv(io::ErrorKind::ConnectionReset));
        let mut gate = ResultGate::new(reset, Duration::from_secs(5), cb);
        let err = gate.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(*seen.lock().unwrap(), Some(Err(GateError::Reset)));
    }

    /// quinn's lost connection (`NotConnected`), HTTP/2's GOAWAY
    /// (`ConnectionAborted`): counted as such, not as the agent breaking
    /// the protocol.
    #[tokio::test]
    async fn a_connection_lost_before_the_answer_is_reported_as_such() {
        for kind in [
            io::ErrorKind::NotConnected,
            io::ErrorKind::ConnectionAborted,
        ] {
            let (cb, seen) = recorder();
            let mut gate = ResultGate::new(Recv(FailedRecv(kind)), Duration::from_secs(5), cb);
            gate.read_to_end(&mut Vec::new()).await.unwrap_err();
            let seen = seen.lock().unwrap().clone();
            assert_eq!(seen, Some(Err(GateError::ConnectionLost)), "{kind:?}");
            assert_eq!(GateError::ConnectionLost.label(), "connection_lost");
        }
    }

    #[tokio::test]
    async fn garbage_and_early_end_are_errors() {
        let (cb, _) = recorder();
        let mut gate = ResultGate::new(bytes(b"HTTP/1.1 200".to_vec()), Duration::from_secs(5), cb);
        assert!(gate.read_to_end(&mut Vec::new()).await.is_err());
        let (cb, _) = recorder();
        let mut gate = ResultGate::new(bytes(vec![0x11, 0]), Duration::from_secs(5), cb);
        assert!(gate.read_to_end(&mut Vec::new()).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_times_out() {
        let (cb, seen) = recorder();
        let (_keep, rx) = tokio::io::duplex(64);
        let mut gate = ResultGate::new(Recv(rx), Duration::from_secs(3), cb);
        let err = gate.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(*seen.lock().unwrap(), Some(Err(GateError::Timeout)));
    }
}
