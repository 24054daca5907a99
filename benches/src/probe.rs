//! Looking at the tunnel's processes while a workload runs: admin
//! endpoints asked with a deadline (never a panic when one does not
//! answer), gauges from `/metrics`, and what `/proc` says of resident
//! memory and open descriptors.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proc_stats::proc_status;

/// An HTTP/1.0 GET of `path` within `within`: the status, the body and
/// how long the whole exchange took, or why it failed.
pub async fn timed_get(
    addr: SocketAddr,
    path: &str,
    within: Duration,
) -> Result<(u16, String, Duration), String> {
    let start = Instant::now();
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut all = Vec::new();
        tcp.read_to_end(&mut all).await?;
        Ok::<_, std::io::Error>(all)
    };
    let all = match tokio::time::timeout(within, exchange).await {
        Err(_) => return Err(format!("no answer within {within:?}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(all)) => all,
    };
    let text = String::from_utf8_lossy(&all);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", &text[..text.len().min(40)]))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body, start.elapsed()))
}

/// The value of the first sample of `series` (a metric name, with labels
/// if any) in a Prometheus text page.
pub fn gauge(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    })
}

/// Open file descriptors of `pid` (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// What one process holds: resident memory, descriptors, tokio tasks.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: u64,
    /// `edge_tunnel_tasks` / `edge_tunnel_agent_tasks`; 0 if not scraped.
    pub tasks: u64,
}

impl Usage {
    /// `pid`'s memory and descriptors now, with `tasks` from a scrape.
    pub fn of(pid: u32, tasks: u64) -> Usage {
        Usage {
            rss_kib: proc_status(pid, "VmRSS:"),
            fds: open_fds(pid),
            tasks,
        }
    }

    /// The larger of each field.
    pub fn max(self, other: Usage) -> Usage {
        Usage {
            rss_kib: self.rss_kib.max(other.rss_kib),
            fds: self.fds.max(other.fds),
            tasks: self.tasks.max(other.tasks),
        }
    }
}

/// The tokio task gauge from the admin endpoint at `admin` (`name` is
/// `edge_tunnel_tasks` or `edge_tunnel_agent_tasks`); `None` if it did not
/// answer within 2 s.
pub async fn tasks(admin: SocketAddr, name: &str) -> Option<u64> {
    let (_, page, _) = timed_get(admin, "/metrics", Duration::from_secs(2))
        .await
        .ok()?;
    gauge(&page, name).map(|v| v as u64)
}

/// Sorted durations' `p` quantile in milliseconds (0 for none).
pub fn quantile_ms(sorted: &[Duration], p: f64) -> f64 {
    crate::load::percentile(sorted, p).as_secs_f64() * 1e3
}
