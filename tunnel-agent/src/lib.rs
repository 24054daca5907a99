//! tunnel-agent: the edge side of edge-tunnel.
//!
//! Layout:
//! - [`config`]: flags turned into a validated [`AgentConfig`], including
//!   the check that `--node-name` is the certificate's CN.
//! - [`allow`]: the allow-list of targets the agent will dial.
//! - [`backoff`]: exponential backoff with full jitter for reconnects.
//! - [`supervisor`]: [`run`], the top level: resolves `--server` and keeps
//!   one connection to every replica address it finds.
//! - [`session`]: one connection to one replica: register on the control
//!   stream, accept streams, drain; its reconnect loop with backoff.
//! - [`h2_session`]: the same session over HTTP/2 over TLS (the agent
//!   serves HTTP/2), with QUIC re-probes in `auto` mode.
//! - [`telemetry`]: the admin endpoint and the agent's metrics.
//! - [`dial`]: one tunneled stream: read `Dial`, check the allow-list,
//!   connect with a deadline, answer `DialResult`, relay.
#![forbid(unsafe_code)]

pub mod allow;
pub mod backoff;
pub mod config;
pub mod dial;
pub mod h2_session;
pub mod session;
pub mod supervisor;
pub mod telemetry;

pub use config::{AgentConfig, ConfigError};
pub use supervisor::run;
