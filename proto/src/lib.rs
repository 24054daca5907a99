//! The edge-tunnel wire protocol, with no I/O.
//!
//! Layout:
//! - [`message`]: the messages agent and server exchange ([`Message`]) and
//!   the codes they carry.
//! - [`codec`]: framing (`type u8 | length u16 | body`) and the encoder and
//!   decoder. The decoder checks that a whole frame is present before it
//!   parses anything and rejects oversize, truncated and unknown input with a
//!   [`DecodeError`]; it never panics (property-tested).
//! - [`codes`]: QUIC application error codes for stream resets and
//!   connection closes, so both ends agree on what a reset means.
//!
//! Like `quinn-proto`, this crate has no sockets, no clocks and no runtime:
//! the transports in the `transport` crate drive it.
#![forbid(unsafe_code)]

pub mod codec;
pub mod codes;
pub mod message;

pub use codec::{
    decode, encode, truncate_reason, DecodeError, EncodeError, FRAME_HEADER_LEN, MAX_FRAME_BODY,
};
pub use message::{
    dial_flags, DialCode, DialRequest, DialResult, Enroll, GoAway, Hello, Issued, Message, Refusal,
    RefuseCode, Renew, Welcome,
};

/// ALPN protocol id: names the protocol and its major version. A peer that
/// speaks another major version fails the TLS handshake with a clear
/// "no application protocol" alert instead of misparsing frames.
pub const ALPN: &[u8] = b"edge-tunnel/1";

/// ALPN of the HTTP/2-over-TLS fallback transport (same messages, carried
/// in HTTP/2 streams with the roles reversed: the agent serves HTTP/2).
pub const ALPN_H2: &[u8] = b"edge-tunnel-h2/1";

/// Major protocol version carried in [`Hello`] and [`Welcome`]. A different
/// major version is refused ([`RefuseCode::UnsupportedVersion`]).
pub const VERSION_MAJOR: u8 = 1;
/// Minor protocol version: additions that older peers may ignore.
pub const VERSION_MINOR: u8 = 5;

/// Longest node name accepted (a DNS-1123 subdomain, as Kubernetes node names are).
pub const MAX_NODE_NAME: usize = 253;
/// Most addresses an agent may announce in its [`Hello`].
pub const MAX_ADDRESSES: usize = 32;
/// Longest human-readable reason carried in a refusal, dial result or
/// `GoAway`, in bytes; longer ones are cut when encoded ([`truncate_reason`]).
pub const MAX_REASON: usize = 1024;
/// Longest bootstrap token (`ID.SECRET`) in an `Enroll`.
pub const MAX_TOKEN: usize = 64;
/// Largest CSR (DER) in an `Enroll` or `Renew`.
pub const MAX_CSR: usize = 4096;
/// Largest PEM text in an `Issued` (the certificate, and the CA bundle,
/// each): both fit one frame.
pub const MAX_ISSUED_PEM: usize = 7 * 1024;

/// Capability bits an agent announces in [`Hello::capabilities`].
pub mod capability {
    // Bit 0 is reserved (once "sends Drain": every agent does).
    /// This connection takes over from the agent's previous one (a
    /// transport switch): let the old one finish its streams instead of
    /// closing it at once.
    pub const HANDOVER: u32 = 1 << 1;
    /// Another agent process on this node is still running (it holds the
    /// agent's instance lock): this one is its successor (a rolling update
    /// with surge). The server routes new streams here, lets the other
    /// process's connection finish its streams, and refuses that process
    /// ([`RefuseCode::Superseded`]) while this connection lives.
    ///
    /// [`RefuseCode::Superseded`]: crate::RefuseCode::Superseded
    pub const SUCCESSOR: u32 = 1 << 2;
}
