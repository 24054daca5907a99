//! Transports and the transport-neutral stream.
//!
//! Layout:
//! - [`stream`]: [`TunnelSend`] / [`TunnelRecv`], the two halves of one
//!   tunneled connection. This is the seam: everything above it (dial,
//!   relay, half-close, reset) is written once, whatever carries the bytes.
//! - [`framed`]: reading and writing one `proto` frame on a stream without
//!   reading past it (raw bytes follow the frame).
//! - [`gate`]: the optimistic open: relay before the dial result, read it first.
//! - [`relay`]: the duplex copy between a TCP socket and a tunnel stream,
//!   mapping half-close to FIN and resets to resets.
//! - [`quic`]: QUIC endpoints (quinn) with the settings both ends share.
//! - [`h2`]: the HTTP/2-over-TLS fallback's stream halves and settings.
//! - [`window`]: every receive window of a process drawn from one budget,
//!   and the credit lent to streams whose reader stalled.
//! - [`net`]: socket helpers: large listen backlogs, original destination.
#![forbid(unsafe_code)]

pub mod framed;
pub mod gate;
pub mod h2;
pub mod net;
pub mod quic;
pub mod relay;
pub mod stream;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod window;

pub use framed::{read_message, write_message, FrameError};
pub use relay::{
    relay, BufferBudget, ClientSocket, Direction, Opening, OpeningSent, RelayLimits, RelayOutcome,
    RelayProgress, StopSignal,
};
pub use stream::{
    mark_control, QuicSend, StreamOrder, TunnelRecv, TunnelSend, TunnelStream, CONTROL_PRIORITY,
};
