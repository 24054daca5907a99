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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use proto::{DialCode, Message, FRAME_HEADER_LEN, MAX_FRAME_BODY};
use tokio::io::{AsyncRead, ReadBuf};

use crate::stream::TunnelRecv;

/// Why the gate did not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateError {
    Refused { code: DialCode, message: String },
    Timeout,
    Protocol(String),
}

impl GateError {
    /// Stable label for metrics (the same labels as a waited-for dial).
    pub fn label(&self) -> &'static str {
        match self {
            GateError::Refused { code, .. } => code.label(),
            GateError::Timeout => "timeout",
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
        }
    }

    fn fail(&mut self, e: GateError) -> io::Error {
        let kind = match e {
            GateError::Timeout => io::ErrorKind::TimedOut,
            GateError::Refused { .. } => io::ErrorKind::ConnectionRefused,
            GateError::Protocol(_) => io::ErrorKind::InvalidData,
        };
        let text = format!("dial failed: {e:?}");
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

    fn poll_chunks(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &mut [bytes::Bytes],
    ) -> Poll<io::Result<Option<usize>>> {
        if !self.open {
            ready!(self.poll_result(cx))?;
        }
        self.inner.poll_chunks(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::DialResult;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;

    /// Any reader as a receive half.
    struct Recv<T>(T);
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
        fn poll_chunks(
            &mut self,
            cx: &mut Context<'_>,
            bufs: &mut [bytes::Bytes],
        ) -> Poll<io::Result<Option<usize>>> {
            crate::stream::poll_chunks_by_copy(self, cx, bufs)
        }
    }

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

    /// The relay takes chunks: the frame is read first, and only the bytes
    /// after it come out.
    #[tokio::test]
    async fn chunks_start_after_the_result() {
        let (cb, seen) = recorder();
        let mut gate = ResultGate::new(
            wire(DialResult::ok(), b"payload"),
            Duration::from_secs(5),
            cb,
        );
        let mut chunks = [bytes::Bytes::new(), bytes::Bytes::new()];
        let n = std::future::poll_fn(|cx| gate.poll_chunks(cx, &mut chunks))
            .await
            .unwrap();
        assert_eq!(n, Some(1));
        assert_eq!(&chunks[0][..], b"payload");
        assert!(matches!(*seen.lock().unwrap(), Some(Ok(_))));
        let end = std::future::poll_fn(|cx| gate.poll_chunks(cx, &mut chunks))
            .await
            .unwrap();
        assert_eq!(end, None);
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
