//! QUIC application error codes.
//!
//! Stream reset codes tell the other end *why* a tunneled connection ended
//! abruptly, so it can map the reset onto TCP (an RST) and count it.
//! Connection close codes say why an agent connection went away.

/// Codes used with `RESET_STREAM` / `STOP_SENDING` on a tunneled stream.
pub mod stream {
    /// The TCP peer on the other end reset its connection (RST).
    pub const TCP_RESET: u32 = 0x01;
    /// The relay hit a local I/O error other than a reset.
    pub const IO_ERROR: u32 = 0x02;
    /// A frame on the stream was malformed or arrived out of order.
    pub const PROTOCOL: u32 = 0x03;
    // 0x04 is reserved (once "shutdown"; a drain that runs out of grace
    // closes the whole connection with `close::AGENT_DRAINED` instead).
    /// The stream was not wanted any more (for example a dial that failed).
    pub const CANCELLED: u32 = 0x05;
}

/// Codes used when closing a whole agent connection.
pub mod close {
    /// Normal close.
    pub const NORMAL: u32 = 0x00;
    /// A newer connection registered the same node; this one is replaced.
    pub const REPLACED: u32 = 0x01;
    /// Registration was refused; the reason travelled on the control stream.
    pub const REFUSED: u32 = 0x02;
    /// The server is shutting down.
    pub const SERVER_SHUTDOWN: u32 = 0x03;
    /// The agent drained and is leaving.
    pub const AGENT_DRAINED: u32 = 0x04;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 0x05;
    /// The control stream ended, which ends the registration.
    pub const CONTROL_CLOSED: u32 = 0x06;
    /// The agent's certificate was revoked (the server's deny-list).
    pub const REVOKED: u32 = 0x07;
    /// The agent's certificate expired while it was connected.
    pub const CERTIFICATE_EXPIRED: u32 = 0x08;
    /// An enrollment or renewal finished (or was refused): the connection
    /// served only that.
    pub const ENROLLED: u32 = 0x09;
}
