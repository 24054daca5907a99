//! One `proto` frame at a time on a byte stream.
//!
//! Raw relayed bytes follow the `Dial`/`DialResult` frames on the same
//! stream, so the reader takes exactly the header and then exactly the body
//! it announces, never more.

use std::io;

use proto::{DecodeError, Message, FRAME_HEADER_LEN, MAX_FRAME_BODY};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream ended before a whole frame arrived")]
    UnexpectedEof,
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode frame: {0}")]
    Encode(#[from] proto::EncodeError),
    #[error("stream error: {0}")]
    Io(#[source] io::Error),
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::UnexpectedEof
        } else {
            FrameError::Io(e)
        }
    }
}

/// Reads exactly one frame. `buf` is scratch space reused across calls.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Message, FrameError> {
    buf.clear();
    buf.resize(FRAME_HEADER_LEN, 0);
    r.read_exact(&mut buf[..FRAME_HEADER_LEN]).await?;
    // Let the decoder judge the header (type, length bound) before we
    // allocate or wait for a body.
    if let Some((msg, _)) = proto::decode(buf)? {
        return Ok(msg);
    }
    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
    debug_assert!(len <= MAX_FRAME_BODY);
    buf.resize(FRAME_HEADER_LEN + len, 0);
    r.read_exact(&mut buf[FRAME_HEADER_LEN..]).await?;
    match proto::decode(buf)? {
        Some((msg, _)) => Ok(msg),
        None => Err(FrameError::UnexpectedEof),
    }
}

/// Writes one frame.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), FrameError> {
    let mut buf = Vec::with_capacity(64);
    proto::encode(msg, &mut buf)?;
    w.write_all(&buf).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{DialRequest, DialResult};

    #[tokio::test]
    async fn reads_one_frame_and_leaves_the_rest() {
        let mut wire = Vec::new();
        proto::encode(
            &Message::Dial(DialRequest {
                target: "127.0.0.1:10250".parse().unwrap(),
                deadline_ms: 5000,
                optimistic: false,
            }),
            &mut wire,
        )
        .unwrap();
        wire.extend_from_slice(b"raw bytes");
        let mut r = wire.as_slice();
        let mut buf = Vec::new();
        let msg = read_message(&mut r, &mut buf).await.unwrap();
        assert!(matches!(msg, Message::Dial(_)));
        assert_eq!(r, b"raw bytes");
    }

    #[tokio::test]
    async fn truncated_and_garbage_are_errors() {
        let mut wire = Vec::new();
        proto::encode(&Message::DialResult(DialResult::ok()), &mut wire).unwrap();
        let mut short = &wire[..wire.len() - 1];
        let mut buf = Vec::new();
        assert!(matches!(
            read_message(&mut short, &mut buf).await,
            Err(FrameError::UnexpectedEof)
        ));
        let mut garbage: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(matches!(
            read_message(&mut garbage, &mut buf).await,
            Err(FrameError::Decode(_))
        ));
    }
}
