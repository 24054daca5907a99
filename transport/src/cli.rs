//! Process setup shared by the `tunnel-server` and `tunnel-agent` binaries.

use std::io::{self, IsTerminal};

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Shape of the tokio runtime.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum RuntimeShape {
    /// One thread: fewest cross-thread wake-ups, lowest latency per core.
    CurrentThread,
    /// One worker per core.
    MultiThread,
}

/// Flags both binaries take.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Log format; the filter comes from RUST_LOG (default "info").
    #[arg(long, env = "TUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Runtime shape.
    #[arg(long, env = "TUNNEL_RUNTIME", value_enum, default_value_t = RuntimeShape::MultiThread)]
    pub runtime: RuntimeShape,
    /// Worker threads for the multi-thread runtime (default: half the
    /// cores for the server, one for the agent).
    #[arg(long, env = "TUNNEL_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: Option<u16>,
}

impl Common {
    /// `default_workers`: worker threads when `--worker-threads` is not
    /// given (`None`: one per core).
    pub fn runtime(&self, default_workers: Option<u16>) -> io::Result<tokio::runtime::Runtime> {
        let mut builder = match self.runtime {
            RuntimeShape::CurrentThread => tokio::runtime::Builder::new_current_thread(),
            RuntimeShape::MultiThread => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if let Some(n) = self.worker_threads.or(default_workers) {
                    b.worker_threads(n.into());
                }
                b
            }
        };
        builder.enable_all().build()
    }
}

/// Installs the tracing subscriber: RUST_LOG filter, text or JSON lines on stderr.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: `kubectl logs` and files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is
/// called (inside the runtime), not when the future is first polled, so a
/// signal that arrives while the process is still busy starting is not
/// lost to the default action (which would kill it before cleanup).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("cannot listen for SIGTERM/SIGINT: {e}");
                std::future::pending::<()>().await
            }
        }
    }
}
