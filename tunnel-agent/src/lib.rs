//! tunnel-agent: the edge side of edge-tunnel.
//!
//! Layout:
//! - [`config`]: flags turned into a validated [`AgentConfig`], including
//!   the check that `--node-name` is the certificate's CN.
//! - [`allow`]: the allow-list of targets the agent will dial.
//! - [`backoff`]: exponential backoff with full jitter for reconnects.
//! - [`session`]: one connection to the server: dial, register on the
//!   control stream, accept streams, drain; and [`run`], the reconnect loop.
//! - [`dial`]: one tunneled stream: read `Dial`, check the allow-list,
//!   connect with a deadline, answer `DialResult`, relay.
#![forbid(unsafe_code)]

pub mod allow;
pub mod backoff;
pub mod config;
pub mod dial;
pub mod session;

pub use config::{AgentConfig, ConfigError};
pub use session::run;
