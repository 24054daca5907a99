//! The transport-neutral stream halves.
//!
//! A tunneled connection is a send half and a receive half. Reads and
//! writes are plain `AsyncRead` / `AsyncWrite`; a peer's reset shows up as
//! an `io::ErrorKind::ConnectionReset` error. What TCP cannot express
//! through those traits — aborting a direction with a reason — is here.

use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A future the relay awaits once per stream, not per chunk.
pub type Delivered = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Sending half of a tunneled stream. `poll_shutdown` is a clean FIN.
pub trait TunnelSend: AsyncWrite + Unpin + Send {
    /// Abandons the stream with `code` (a `proto::codes::stream` value); the
    /// peer's reads fail with a reset.
    fn reset(&mut self, code: u32);

    /// Completes once the peer has acknowledged everything sent, FIN
    /// included (or the stream or connection ended). Closing a connection
    /// before this would turn a clean FIN into a reset at the other end.
    fn delivered(&self) -> Delivered;
}

/// Receiving half of a tunneled stream. EOF is the peer's FIN.
pub trait TunnelRecv: AsyncRead + Unpin + Send {
    /// Tells the peer we will read no more (`code` says why); its writes fail.
    fn stop(&mut self, code: u32);
}

impl TunnelSend for quinn::SendStream {
    fn reset(&mut self, code: u32) {
        // Err only if already finished or reset: nothing left to abandon.
        let _ = quinn::SendStream::reset(self, quinn::VarInt::from_u32(code));
    }

    fn delivered(&self) -> Delivered {
        let stopped = self.stopped();
        Box::pin(async move {
            let _ = stopped.await;
        })
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
