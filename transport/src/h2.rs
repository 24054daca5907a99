//! The HTTP/2-over-TLS transport's stream halves, and its settings.
//!
//! Roles are reversed once TLS is up: the agent (which dialed) serves
//! HTTP/2, the cloud side is the HTTP/2 client and opens one request per
//! tunneled connection. The request body carries cloud → edge bytes, the
//! response body edge → cloud bytes. [`H2Send`] and [`H2Recv`] adapt h2's
//! streams to [`TunnelSend`] / [`TunnelRecv`], so the relay and the dial
//! code are the same as over QUIC.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stream::{Delivered, TunnelRecv, TunnelSend};

/// Flow-control settings and memory bounds for both HTTP/2 ends. The
/// windows are larger than QUIC's (512 KiB / 4 MiB) because one TCP
/// connection has to carry what QUIC spreads over its streams' own loss
/// recovery; the ratio is 1:32 (QUIC's is 1:8): 32 stalled readers use up
/// the connection window, after which the stall credit lends more (see
/// `stall`).
///
/// The cloud side is the HTTP/2 *client* of an agent it cannot fully
/// trust (a compromised edge node has a valid certificate), so
/// [`Self::client`] also turns off everything in which the agent could
/// make it hold memory that no stream asked for: server push (h2 stores
/// every PUSH_PROMISE until someone takes it, and nothing here would),
/// streams opened by the agent, and header lists beyond a few KiB.
#[derive(Clone, Copy, Debug)]
pub struct H2Settings {
    /// Per-stream window: what one stalled reader can pin. Default 1 MiB.
    pub stream_window: u32,
    /// Per-connection window across all streams: the worst-case buffered
    /// memory per agent connection. Default 32 MiB.
    pub connection_window: u32,
    /// Streams the server may have open to one agent at once. Default 8192.
    pub max_streams: u32,
    /// Largest DATA frame (16 KiB..16 MiB); bigger frames, fewer headers.
    pub max_frame: u32,
    /// Largest decoded header list either end accepts
    /// (SETTINGS_MAX_HEADER_LIST_SIZE; it also bounds what h2 buffers of a
    /// header block while it arrives). Our requests and responses carry a
    /// method, a path and a status: a few dozen bytes. Default 16 KiB
    /// ([`DEFAULT_MAX_HEADER_LIST`]; h2's own default is 16 MiB). A peer
    /// over it gets its stream reset, or its connection closed when it
    /// is far over.
    pub max_header_list: u32,
    /// Data queued per stream ahead of the socket (h2's send buffer): the
    /// memory a stream holds when the peer's windows are open but its TCP
    /// connection does not drain. Default 256 KiB ([`DEFAULT_SEND_BUFFER`],
    /// four 64 KiB frames); worst case per connection is this times the
    /// open streams.
    pub send_buffer: u32,
}

/// Default [`H2Settings::max_header_list`]: 16 KiB.
pub const DEFAULT_MAX_HEADER_LIST: u32 = 16 * 1024;
/// Default [`H2Settings::send_buffer`]: 256 KiB.
pub const DEFAULT_SEND_BUFFER: u32 = 256 * 1024;

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            max_streams: 8192,
            max_frame: 64 * 1024,
            max_header_list: DEFAULT_MAX_HEADER_LIST,
            send_buffer: DEFAULT_SEND_BUFFER,
        }
    }
}

impl H2Settings {
    /// The cloud side (HTTP/2 client, facing the agent). Push is off, so a
    /// PUSH_PROMISE is a connection error (PROTOCOL_ERROR) and the agent
    /// may open no stream of its own (`max_concurrent_streams(0)`, which
    /// h2 also applies to reserved push streams).
    pub fn client(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame)
            .enable_push(false)
            .max_concurrent_streams(0)
            .max_header_list_size(self.max_header_list)
            .max_send_buffer_size(self.send_buffer as usize);
        b
    }

    /// The agent side (HTTP/2 server, serving the cloud's streams).
    pub fn server(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame)
            .max_concurrent_streams(self.max_streams)
            .max_header_list_size(self.max_header_list)
            .max_send_buffer_size(self.send_buffer as usize);
        b
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_reset() || e.is_go_away() {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::NotConnected, e)
    }
}

/// Sending half: writes become DATA frames once the peer's window allows.
pub struct H2Send {
    inner: h2::SendStream<Bytes>,
    finished: bool,
}

impl H2Send {
    pub fn new(inner: h2::SendStream<Bytes>) -> Self {
        H2Send {
            inner,
            finished: false,
        }
    }
}

impl H2Send {
    /// Waits for send capacity for up to `want` bytes; how much was granted.
    fn poll_granted(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.inner.reserve_capacity(want);
        loop {
            match ready!(self.inner.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "h2 stream closed",
                    )))
                }
            }
        }
    }
}

impl AsyncWrite for H2Send {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        let n = ready!(this.poll_granted(cx, buf.len()))?;
        // h2 takes owned frames: a borrowed buffer is copied (the relay
        // hands over owned chunks instead, `poll_write_chunk`).
        this.inner
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.finished {
            self.finished = true;
            self.inner.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl TunnelSend for H2Send {
    fn reset(&mut self, code: u32) {
        self.inner.send_reset(h2::Reason::from(code));
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_granted(cx, chunk.len()))?;
        self.inner
            .send_data(chunk.split_to(n), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(()))
    }

    fn delivered(&self) -> Delivered {
        // HTTP/2 runs on TCP: what h2 has written reaches the peer unless
        // the whole connection fails; nothing to wait for per stream.
        Box::pin(std::future::ready(()))
    }
}

/// Receiving half: a response that may still be on its way, then its body.
pub enum H2Recv {
    Pending(h2::client::ResponseFuture),
    Body { body: h2::RecvStream, chunk: Bytes },
}

impl H2Recv {
    pub fn body(body: h2::RecvStream) -> Self {
        H2Recv::Body {
            body,
            chunk: Bytes::new(),
        }
    }
}

impl AsyncRead for H2Recv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this {
                H2Recv::Pending(fut) => {
                    let resp = ready!(Pin::new(fut).poll(cx)).map_err(to_io)?;
                    if resp.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("agent answered {}", resp.status()),
                        )));
                    }
                    *this = H2Recv::body(resp.into_body());
                }
                H2Recv::Body { body, chunk } => {
                    if !chunk.is_empty() {
                        let n = chunk.len().min(buf.remaining());
                        buf.put_slice(&chunk[..n]);
                        chunk.advance(n);
                        // Hand the window back as the bytes leave.
                        let _ = body.flow_control().release_capacity(n);
                        return Poll::Ready(Ok(()));
                    }
                    match ready!(body.poll_data(cx)) {
                        Some(Ok(data)) => *chunk = data,
                        Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                        None => return Poll::Ready(Ok(())),
                    }
                }
            }
        }
    }
}

impl TunnelRecv for H2Recv {
    fn stop(&mut self, _code: u32) {
        // HTTP/2 has no STOP_SENDING: the send half's reset ends the whole
        // stream, and the relay always resets both halves together.
    }
}
