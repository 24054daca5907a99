//! Stream halves for tests (here, and in other crates with the `testing`
//! feature): any reader or writer as a tunnel half, and a send half that
//! records each write.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stream::{Delivered, TunnelRecv, TunnelSend};

/// Any reader as a receive half.
pub struct Recv<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Recv<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + Unpin + Send> TunnelRecv for Recv<T> {
    fn stop(&mut self, _: u32) {}
}

/// Any writer as a send half.
pub struct Sink<T>(pub T);

impl<T: AsyncWrite + Unpin> AsyncWrite for Sink<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<T: AsyncWrite + Unpin + Send> TunnelSend for Sink<T> {
    fn reset(&mut self, _: u32) {}
    fn delivered(&self) -> Delivered {
        Box::pin(async {})
    }
}

/// What a [`Recorder`] was given: each write call's bytes, in order, and
/// whether the stream was finished.
#[derive(Default, Debug)]
pub struct Recorded {
    pub writes: Vec<Vec<u8>>,
    /// The chunks handed over by [`TunnelSend::poll_write_chunk`] (also in
    /// `writes`), kept as a transport keeps them until they are delivered.
    pub chunks: Vec<Bytes>,
    /// Every send priority set, in order, with the bytes written before it.
    pub priorities: Vec<(i32, usize)>,
    pub finished: bool,
    /// The code of the reset, if the stream was reset.
    pub reset: Option<u32>,
}

/// A send half that records every write call; the test reads it while the
/// relay runs, and is woken on each change.
#[derive(Clone, Default)]
pub struct Recorder {
    pub seen: Arc<Mutex<Recorded>>,
    pub changed: Arc<tokio::sync::Notify>,
}

impl Recorder {
    /// Waits until `done` holds for what was recorded.
    pub async fn until(&self, done: impl Fn(&Recorded) -> bool) {
        loop {
            let changed = self.changed.notified();
            if done(&self.seen.lock().unwrap()) {
                return;
            }
            changed.await;
        }
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.seen.lock().unwrap().writes.push(buf.to_vec());
        self.changed.notify_waiters();
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.seen.lock().unwrap().finished = true;
        self.changed.notify_waiters();
        Poll::Ready(Ok(()))
    }
}

impl TunnelSend for Recorder {
    fn reset(&mut self, code: u32) {
        self.seen.lock().unwrap().reset = Some(code);
        self.changed.notify_waiters();
    }
    fn delivered(&self) -> Delivered {
        Box::pin(async {})
    }
    fn poll_write_chunk(&mut self, _: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        let chunk = std::mem::take(chunk);
        let mut seen = self.seen.lock().unwrap();
        seen.writes.push(chunk.to_vec());
        seen.chunks.push(chunk);
        self.changed.notify_waiters();
        Poll::Ready(Ok(()))
    }
    fn set_priority(&mut self, priority: i32) {
        let mut seen = self.seen.lock().unwrap();
        let written = seen.writes.iter().map(Vec::len).sum();
        seen.priorities.push((priority, written));
    }
}
