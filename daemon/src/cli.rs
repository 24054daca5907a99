//! Process setup shared by the `tunnel-server` and `tunnel-agent` binaries:
//! logging, runtime shape, shutdown signals, and the parsers for duration
//! and size flags.

use std::io::{self, IsTerminal};
use std::time::Duration;

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
    /// `current-thread` where the runtime would get one worker, otherwise
    /// `multi-thread`: one worker of a multi-thread runtime runs no more in
    /// parallel than one thread does, and on the benchmark it cost more CPU
    /// per connection and more peak memory (benches/RESULTS.md).
    Auto,
    /// One thread: fewest cross-thread wake-ups, lowest latency per core.
    CurrentThread,
    /// `--worker-threads` workers (default: the binary's).
    MultiThread,
}

/// Flags both binaries take.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Log format; the filter comes from RUST_LOG (default "info").
    #[arg(long, env = "TUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Runtime shape: auto is current-thread when the runtime would get one
    /// worker, multi-thread otherwise.
    #[arg(long, env = "TUNNEL_RUNTIME", value_enum, default_value_t = RuntimeShape::Auto)]
    pub runtime: RuntimeShape,
    /// Worker threads for the multi-thread runtime (default: half the
    /// cores for the server, one for the agent).
    #[arg(long, env = "TUNNEL_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: Option<u16>,
    /// Connections the admin listener (--admin-listen) serves at once;
    /// more wait in its listen backlog (1-4096).
    #[arg(long, env = "TUNNEL_ADMIN_MAX_CONNECTIONS", default_value_t = crate::admin::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub admin_max_connections: u16,
}

impl Common {
    /// `default_workers`: worker threads when `--worker-threads` is not
    /// given (`None`: one per core).
    pub fn runtime(&self, default_workers: Option<u16>) -> io::Result<tokio::runtime::Runtime> {
        let (shape, workers) = self.shape(default_workers);
        tracing::debug!(?shape, ?workers, "tokio runtime");
        let mut builder = match shape {
            RuntimeShape::MultiThread => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if let Some(n) = workers {
                    b.worker_threads(n.into());
                }
                b
            }
            _ => tokio::runtime::Builder::new_current_thread(),
        };
        builder.enable_all().build()
    }

    /// The shape `auto` resolves to, and the workers of a multi-thread
    /// runtime (`None`: one per core).
    pub fn shape(&self, default_workers: Option<u16>) -> (RuntimeShape, Option<u16>) {
        let workers = self.worker_threads.or(default_workers);
        let shape = match self.runtime {
            RuntimeShape::Auto => {
                let n = workers.map_or_else(
                    || std::thread::available_parallelism().map_or(1, |n| n.get()),
                    usize::from,
                );
                if n <= 1 {
                    RuntimeShape::CurrentThread
                } else {
                    RuntimeShape::MultiThread
                }
            }
            shape => shape,
        };
        (shape, workers)
    }
}

/// The relay flags both binaries take.
#[derive(Args, Debug, Clone)]
pub struct Relay {
    /// What the relay buffers of all tunneled connections together may
    /// grow into beyond their first 4 KiB per direction (a busy
    /// connection's buffer doubles up to 64 KiB); past it, connections
    /// keep relaying with the buffer they have (0-4Gi).
    #[arg(long, env = "TUNNEL_RELAY_BUFFER_BUDGET", default_value = "16Mi", value_parser = size_in(0, 4 << 30))]
    pub relay_buffer_budget: u64,
}

impl Relay {
    /// The budget the process's relays share.
    pub fn buffers(&self) -> transport::BufferBudget {
        transport::BufferBudget::new(self.relay_buffer_budget)
    }
}

/// QUIC flow-control windows, both binaries. Each is what one connection
/// may hold in memory at most (received and not yet relayed, or written
/// and not yet acknowledged); the defaults carry ~670 Mbit/s per
/// connection and ~80 Mbit/s per stream at 50 ms RTT.
#[derive(Args, Debug, Clone)]
pub struct QuicWindows {
    /// What one tunneled connection may have received over QUIC and not
    /// yet relayed (its stream's receive window), and what a stalled one
    /// is lent (16Ki-16Mi; at most --quic-connection-window).
    #[arg(long, env = "TUNNEL_QUIC_STREAM_WINDOW", default_value = "512Ki", value_parser = size_in(16 << 10, 16 << 20))]
    pub quic_stream_window: u64,
    /// What one QUIC connection may have received and not yet relayed,
    /// all its streams together, before credit lent to stalled streams;
    /// --receive-budget shares are at most this (64Ki-1Gi).
    #[arg(long, env = "TUNNEL_QUIC_CONNECTION_WINDOW", default_value = "4Mi", value_parser = size_in(64 << 10, 1 << 30))]
    pub quic_connection_window: u64,
    /// What one QUIC connection may have written and not yet had
    /// acknowledged, all its streams together: its send buffers
    /// (64Ki-1Gi).
    #[arg(long, env = "TUNNEL_QUIC_SEND_WINDOW", default_value = "4Mi", value_parser = size_in(64 << 10, 1 << 30))]
    pub quic_send_window: u64,
}

impl QuicWindows {
    /// Sets the windows in `quic` (the ranges above fit in a `u32`).
    pub fn apply(&self, quic: &mut transport::quic::QuicSettings) {
        let fit = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        quic.stream_window = fit(self.quic_stream_window);
        quic.connection_window = fit(self.quic_connection_window);
        quic.send_window = fit(self.quic_send_window);
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

/// Parses a duration flag the way Kubernetes writes them: `500ms`, `10s`,
/// `5m`, `1h`, `1h30m` (any unit `humantime` knows). A plain integer is
/// seconds, so `10` is 10 s, as the flags took before units existed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("{s:?} is not a duration ({e}): use seconds (10) or a number with a unit (500ms, 10s, 5m, 1h)")
    })
}

/// A clap value parser for a duration flag that must lie in `min..=max`
/// (bounds in the message in the same form the flag takes).
pub fn duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let d = parse_duration(s)?;
        let show = humantime::format_duration;
        if d < min {
            return Err(format!(
                "{} is shorter than the minimum, {}",
                show(d),
                show(min)
            ));
        }
        if d > max {
            return Err(format!(
                "{} is longer than the maximum, {}",
                show(d),
                show(max)
            ));
        }
        Ok(d)
    }
}

/// Parses a size flag the way Kubernetes writes memory: `256Mi`, `64Ki`,
/// `1Gi` (binary units; a trailing `B` is accepted: `256MiB`), or a plain
/// number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t2 = t.strip_suffix('B').unwrap_or(t);
    let (digits, shift) = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40)]
        .iter()
        .find_map(|(unit, shift)| t2.strip_suffix(unit).map(|d| (d, *shift)))
        .unwrap_or((t, 0));
    let bad = || {
        format!("{t:?} is not a size: use bytes (65536) or a number with a binary unit (64Ki, 256Mi, 1Gi)")
    };
    let n: u64 = digits.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Formats bytes in the largest binary unit that divides them.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A clap value parser for a size flag that must lie in `min..=max`.
pub fn size_in(
    min: u64,
    max: u64,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s| {
        let n = parse_size(s)?;
        if n < min {
            return Err(format!(
                "{} is below the minimum, {}",
                format_size(n),
                format_size(min)
            ));
        }
        if n > max {
            return Err(format!(
                "{} is above the maximum, {}",
                format_size(n),
                format_size(max)
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Shape {
        #[command(flatten)]
        common: Common,
    }

    fn shape(args: &[&str], default_workers: Option<u16>) -> (RuntimeShape, Option<u16>) {
        use clap::Parser;
        let argv = std::iter::once("test").chain(args.iter().copied());
        Shape::try_parse_from(argv)
            .unwrap()
            .common
            .shape(default_workers)
    }

    #[test]
    fn the_admin_connection_limit_defaults_to_64_and_refuses_0() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            let argv = std::iter::once("test").chain(args.iter().copied());
            Shape::try_parse_from(argv).map(|s| s.common.admin_max_connections)
        };
        assert_eq!(parse(&[]).unwrap(), 64);
        assert_eq!(parse(&["--admin-max-connections", "8"]).unwrap(), 8);
        for bad in ["0", "4097", "many"] {
            let e = parse(&["--admin-max-connections", bad]).unwrap_err();
            assert!(e.to_string().contains("--admin-max-connections"), "{e}");
        }
    }

    #[test]
    fn auto_is_one_thread_where_the_runtime_would_get_one_worker() {
        use RuntimeShape::*;
        assert_eq!(shape(&[], Some(1)), (CurrentThread, Some(1)));
        assert_eq!(shape(&[], Some(4)), (MultiThread, Some(4)));
        assert_eq!(
            shape(&["--worker-threads", "2"], Some(1)),
            (MultiThread, Some(2))
        );
        assert_eq!(
            shape(&["--worker-threads", "1"], Some(4)),
            (CurrentThread, Some(1))
        );
        // Asked for explicitly, a shape is kept.
        assert_eq!(
            shape(&["--runtime", "multi-thread"], Some(1)),
            (MultiThread, Some(1))
        );
        assert_eq!(
            shape(&["--runtime", "current-thread"], Some(4)).0,
            CurrentThread
        );
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[derive(clap::Parser, Debug)]
    struct Windows {
        #[command(flatten)]
        windows: QuicWindows,
    }

    fn windows(args: &[&str]) -> Result<transport::quic::QuicSettings, String> {
        use clap::Parser;
        let parsed = Windows::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let mut quic = transport::quic::QuicSettings::default();
        parsed.windows.apply(&mut quic);
        Ok(quic)
    }

    #[test]
    fn the_window_flags_default_to_the_settings_defaults() {
        let defaults = transport::quic::QuicSettings::default();
        let quic = windows(&[]).unwrap();
        assert_eq!(
            (quic.stream_window, quic.connection_window, quic.send_window),
            (
                defaults.stream_window,
                defaults.connection_window,
                defaults.send_window
            )
        );
        let quic = windows(&[
            "--quic-stream-window",
            "1Mi",
            "--quic-connection-window",
            "4Mi",
            "--quic-send-window",
            "2Mi",
        ])
        .unwrap();
        assert_eq!(
            (quic.stream_window, quic.connection_window, quic.send_window),
            (1 << 20, 4 << 20, 2 << 20)
        );
    }

    #[test]
    fn a_window_out_of_range_names_the_flag_and_the_bound() {
        let e = windows(&["--quic-send-window", "2Gi"]).unwrap_err();
        assert!(e.contains("--quic-send-window"), "{e}");
        assert!(e.contains("above the maximum"), "{e}");
        let e = windows(&["--quic-stream-window", "1Ki"]).unwrap_err();
        assert!(e.contains("--quic-stream-window"), "{e}");
        assert!(e.contains("below the minimum"), "{e}");
    }

    #[test]
    fn plain_integers_are_seconds() {
        assert_eq!(parse_duration("10"), Ok(S(10)));
        assert_eq!(parse_duration(" 600 "), Ok(S(600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn kubernetes_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(S(10)));
        assert_eq!(parse_duration("5m"), Ok(S(300)));
        assert_eq!(parse_duration("1h"), Ok(S(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(S(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn garbage_names_the_input() {
        for bad in ["", "ten", "10 parsecs", "-5", "1.5", "s10"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(&format!("{:?}", bad.trim())), "{bad:?}: {e}");
            assert!(e.contains("500ms, 10s, 5m, 1h"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn sizes_take_kubernetes_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64Ki"), Ok(64 << 10));
        assert_eq!(parse_size("256Mi"), Ok(256 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size(" 1Gi "), Ok(1 << 30));
        for bad in ["", "1.5Gi", "256MB", "-1", "Mi", "99999999999Ti"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("64Ki, 256Mi, 1Gi"), "{bad:?}: {e}");
        }
        assert_eq!(format_size(256 << 20), "256Mi");
        assert_eq!(format_size(1000), "1000");
        let p = size_in(1 << 20, 1 << 30);
        assert_eq!(p("512Ki").unwrap_err(), "512Ki is below the minimum, 1Mi");
        assert_eq!(p("2Gi").unwrap_err(), "2Gi is above the maximum, 1Gi");
    }

    #[test]
    fn bounds_are_checked_and_shown() {
        let p = duration_in(S(1), S(600));
        assert_eq!(p("1s"), Ok(S(1)));
        assert_eq!(p("10m"), Ok(S(600)));
        assert_eq!(
            p("500ms").unwrap_err(),
            "500ms is shorter than the minimum, 1s"
        );
        assert_eq!(p("0").unwrap_err(), "0s is shorter than the minimum, 1s");
        assert_eq!(p("11m").unwrap_err(), "11m is longer than the maximum, 10m");
        assert!(p("soon")
            .unwrap_err()
            .contains("\"soon\" is not a duration"));
    }
}
