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
        self.client_with_frame_budget(self.data_frame_budget())
    }

    /// [`Self::client`] with h2's small-frame budget set to
    /// [`Self::frame_budget_for_share`] of the receive-budget share the
    /// connection starts with: what an agent can make the server keep in
    /// h2's bookkeeping follows its share, as the windows do.
    pub fn client_for_share(&self, share: u64) -> h2::client::Builder {
        self.client_with_frame_budget(self.frame_budget_for_share(share))
    }

    /// The small-frame budget for a connection whose window starts at
    /// `share`: four times it (buffered frames of 64 bytes or more never
    /// reach it within the window), at least 1 MiB, at most
    /// [`Self::data_frame_budget`]. A peer sending 1-byte frames can make
    /// h2 keep about as much memory as the budget.
    pub fn frame_budget_for_share(&self, share: u64) -> usize {
        let share = usize::try_from(share).unwrap_or(usize::MAX);
        share
            .saturating_mul(4)
            .clamp(1 << 20, self.data_frame_budget().max(1 << 20))
    }

    fn client_with_frame_budget(&self, frame_budget: usize) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame)
            .enable_push(false)
            .max_concurrent_streams(0)
            .max_header_list_size(self.max_header_list)
            .max_send_buffer_size(self.send_buffer as usize)
            .data_frame_budget(frame_budget)
            .max_concurrent_reset_streams(self.max_streams as usize)
            .reset_stream_duration(RESET_STREAM_MEMORY)
            .max_local_error_reset_streams(None);
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
            .max_send_buffer_size(self.send_buffer as usize)
            .data_frame_budget(self.data_frame_budget())
            .max_concurrent_reset_streams(self.max_streams as usize)
            .reset_stream_duration(RESET_STREAM_MEMORY)
            .max_local_error_reset_streams(None)
            // The server opens a stream per tunneled connection, and a
            // client that resets at once (anyone may connect to the
            // transparent ingress and send an RST) resets its stream
            // before the agent took it: h2 allows 20 such streams per
            // read before it closes the whole connection.
            .max_pending_accept_reset_streams(self.max_streams as usize);
        b
    }

    /// What small DATA frames may cost a connection in h2's bookkeeping
    /// (each frame under 256 bytes is charged 256 − its length while it
    /// waits to be read): twice the configured connection window, fixed.
    /// h2's own default is half the *current* window, which the shared
    /// receive budget shrinks as agents join; one stalled `logs -f` of
    /// short lines then used it up and h2 closed the whole connection
    /// (`ENHANCE_YOUR_CALM`, every tunnel of the node with it). Buffered
    /// frames of 128 bytes or more never reach it within the window; a
    /// peer sending 1-byte frames can make h2 keep about 2 / 255 frames of
    /// bookkeeping per byte of it.
    fn data_frame_budget(&self) -> usize {
        2 * self.connection_window as usize
    }
}

/// How long h2 remembers a stream this end reset, so that frames the peer
/// sent before it learned of the reset are dropped quietly (h2's default,
/// 1 s, is shorter than a window's worth of data on a slow edge link: h2
/// then answers each late frame with a reset of its own, counted towards
/// a limit that closes the connection).
const RESET_STREAM_MEMORY: std::time::Duration = std::time::Duration::from_secs(30);

fn to_io(e: h2::Error) -> io::Error {
    if e.is_go_away() {
        // The whole connection is going: not this stream's peer's doing.
        io::Error::new(io::ErrorKind::ConnectionAborted, e)
    } else if e.is_reset() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Bounds a test that would otherwise hang; never a timing assertion.
    const HANG: Duration = Duration::from_secs(30);

    /// A connection window the receive budget shrank (many agents).
    const SHRUNK_WINDOW: u32 = 128 * 1024;

    #[test]
    fn the_frame_budget_follows_the_share_within_bounds() {
        let s = H2Settings::default();
        assert_eq!(s.frame_budget_for_share(0), 1 << 20);
        assert_eq!(s.frame_budget_for_share(1 << 20), 4 << 20);
        assert_eq!(
            s.frame_budget_for_share(u64::MAX),
            2 * s.connection_window as usize
        );
    }

    /// An agent (h2 server) and a cloud side (h2 client) over an in-memory
    /// pipe, both with `settings`; the client connection's task returns
    /// how it ended.
    async fn pair(
        settings: H2Settings,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
        tokio::sync::oneshot::Sender<u32>,
    ) {
        let (cloud, edge) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move { settings.server().handshake(edge).await });
        // As the server builds it for a connection whose share is the
        // window the test shrinks it to.
        let client = settings.client_for_share(SHRUNK_WINDOW.into());
        let (send, mut conn) = client.handshake(cloud).await.unwrap();
        let (target, set_target) = tokio::sync::oneshot::channel::<u32>();
        let driver = tokio::spawn(async move {
            let mut set_target = set_target;
            tokio::select! {
                r = &mut conn => return r,
                Ok(window) = &mut set_target => conn.set_target_window_size(window),
            }
            conn.await
        });
        let server = server.await.unwrap().unwrap();
        (send, driver, server, target)
    }

    fn request() -> http::Request<()> {
        http::Request::post("https://agent/stream")
            .body(())
            .unwrap()
    }

    /// A stalled reader of short writes (a paused `logs -f`) on a
    /// connection whose share of the receive budget shrank: h2's default
    /// budget for small frames (half the current window) ran out and it
    /// closed the whole connection.
    #[tokio::test]
    async fn small_frames_a_stalled_reader_leaves_unread_keep_the_connection() {
        let (mut send, driver, mut server, target) = pair(H2Settings::default()).await;
        target.send(SHRUNK_WINDOW).unwrap();
        let (response, _body) = send.send_request(request(), false).unwrap();
        let (sent, all_sent) = tokio::sync::oneshot::channel();
        let frames = tokio::spawn(async move {
            let (_, mut respond) = server.accept().await.unwrap().unwrap();
            let mut body = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let frame = Bytes::from_static(&[7; 64]);
            for _ in 0..2_000 {
                body.reserve_capacity(frame.len());
                loop {
                    let granted = std::future::poll_fn(|cx| body.poll_capacity(cx))
                        .await
                        .unwrap()
                        .unwrap();
                    if granted >= frame.len() {
                        break;
                    }
                }
                body.send_data(frame.clone(), false).unwrap();
            }
            let _ = sent.send(());
            // Keep the connection going, and answer one more request.
            let (_, mut respond) = server.accept().await.unwrap().unwrap();
            respond
                .send_response(http::Response::new(()), true)
                .unwrap();
            while server.accept().await.is_some() {}
        });
        // The first stream's response arrives; its body is never read.
        let _unread = tokio::time::timeout(HANG, response).await.unwrap().unwrap();
        // A second stream still gets through behind all 2,000 frames (the
        // pipe keeps their order).
        tokio::time::timeout(HANG, all_sent).await.unwrap().unwrap();
        let mut send = tokio::time::timeout(HANG, send.ready())
            .await
            .unwrap()
            .unwrap();
        let (second, _) = send.send_request(request(), true).unwrap();
        let answer = tokio::time::timeout(HANG, second).await.unwrap();
        assert!(answer.is_ok(), "{answer:?}");
        assert!(!driver.is_finished(), "{:?}", driver.await);
        frames.abort();
    }

    /// Streams the cloud side reset before the agent took them (clients
    /// of the transparent ingress that connect and reset at once): h2
    /// allowed 20 per read before it closed the agent's connection.
    #[tokio::test]
    async fn streams_reset_before_they_are_taken_keep_the_connection() {
        let (mut send, driver, mut server, _target) = pair(H2Settings::default()).await;
        for _ in 0..30 {
            send = tokio::time::timeout(HANG, send.ready())
                .await
                .unwrap()
                .unwrap();
            let (_response, mut body) = send.send_request(request(), false).unwrap();
            body.send_reset(h2::Reason::CANCEL);
        }
        send = tokio::time::timeout(HANG, send.ready())
            .await
            .unwrap()
            .unwrap();
        let (last, _) = send.send_request(request(), true).unwrap();
        let accepting = tokio::spawn(async move {
            while let Some(stream) = server.accept().await {
                let (_, mut respond) = stream?;
                let _ = respond.send_response(http::Response::new(()), true);
            }
            Ok::<_, h2::Error>(())
        });
        let answer = tokio::time::timeout(HANG, last).await.unwrap();
        assert!(answer.is_ok(), "{answer:?}");
        assert!(!accepting.is_finished(), "{:?}", accepting.await);
        assert!(!driver.is_finished(), "{:?}", driver.await);
    }
}
