//! tunnel-agent: the edge side of edge-tunnel.
//!
//! Layout, from the top down:
//! - [`supervisor`]: [`run`], the top level: resolves `--server` ([`resolve`])
//!   and keeps one [`replica::ReplicaLoop`] per address it finds.
//! - [`replica`]: the reconnect loop for one address: connect over the
//!   transport the [`selector`] names, hold the replica ([`replicas`]),
//!   serve, wait, again; QUIC re-probes while on HTTP/2.
//! - [`selector`]: QUIC or HTTP/2, decided from typed events.
//! - [`register`]: the handshake of either transport and `Hello` →
//!   `Welcome`, giving a [`connection::ServerConnection`];
//!   [`diagnose`] says what a failure means.
//! - [`connection`]: one registered connection, whatever the transport.
//! - [`serve`]: the accept / serve / drain loop, written once above it.
//! - [`dial`]: one tunneled stream: read `Dial`, check the allow-list
//!   ([`allow`]), connect with a deadline, answer `DialResult`, relay.
//! - [`config`]: flags turned into an [`AgentConfig`]; the credentials
//!   reloaded from `--cert-dir` at every connection attempt.
//! - [`enroll`]: enrollment with a bootstrap token, and renewal at two
//!   thirds of the certificate's lifetime.
//! - [`backoff`], [`error`], [`telemetry`] (admin endpoint and metrics),
//!   [`probe`] (a one-shot registration, for tests and troubleshooting).
#![forbid(unsafe_code)]

pub mod allow;
pub mod backoff;
pub mod config;
pub mod connection;
pub mod diagnose;
pub mod dial;
pub mod enroll;
pub mod error;
pub mod instance_lock;
pub mod probe;
pub mod register;
pub mod replica;
pub mod replicas;
pub mod resolve;
pub mod selector;
pub mod serve;
pub mod status;
pub mod supervisor;
pub mod telemetry;

pub use config::{AgentConfig, ConfigError};
pub use error::AgentError;
pub use supervisor::run;
