//! What the `tunnel-server` and `tunnel-agent` binaries share besides the
//! tunnel itself, kept out of `transport` so the data path does not depend
//! on clap, tracing-subscriber or an HTTP server:
//! - [`cli`]: flags both binaries take, logging, runtime shape, shutdown
//!   signals, and the parser for Kubernetes-style duration flags.
//! - [`admin`]: the small GET-only HTTP server for admin endpoints.
//! - [`fds`]: the open-files limit, raised at start, and the share of it
//!   connections may use.
//! - [`metrics`]: metrics both binaries export the same way.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod fds;
pub mod metrics;
