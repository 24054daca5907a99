//! Duplex relay between a TCP socket and a tunnel stream.
//!
//! Both directions run in one task (no cross-task hand-off per chunk):
//! - TCP EOF (the peer shut its write side) → FIN on the tunnel stream, and
//!   tunnel EOF → `shutdown(Write)` on the socket, so half-closed
//!   connections keep receiving the rest of the response.
//! - A TCP reset → the tunnel stream is reset (and stopped) with
//!   `TCP_RESET`; a tunnel reset or a lost connection → the socket is closed
//!   with an RST (SO_LINGER 0). Either way the whole connection ends, as it
//!   would on a real TCP path.
//!
//! Each direction owns one buffer that starts small and doubles (up to
//! `MAX_BUF`) while reads keep filling it, so idle connections cost little
//! and bulk transfers make few, large writes.

use std::io;
use std::time::Duration;

use proto::codes::stream as code;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stream::{TunnelRecv, TunnelSend};

/// First buffer size per direction.
pub const MIN_BUF: usize = 16 * 1024;
/// Largest buffer size per direction.
pub const MAX_BUF: usize = 64 * 1024;

/// Longest wait for the peer to acknowledge a finished stream.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// Which way bytes moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the local TCP socket into the tunnel.
    TcpToTunnel,
    /// From the tunnel onto the local TCP socket.
    TunnelToTcp,
}

/// How a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Both directions finished with FIN.
    Closed,
    /// The TCP side reset or failed; the tunnel stream was reset.
    TcpReset,
    /// The tunnel side reset or was lost; the TCP socket was reset.
    TunnelReset,
}

/// Totals for one relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayStats {
    pub outcome: RelayOutcome,
    pub tcp_to_tunnel: u64,
    pub tunnel_to_tcp: u64,
}

enum Failure {
    Tcp(io::Error),
    Tunnel(io::Error),
}

/// Relays until both directions are done or one side resets.
///
/// `on_bytes` is called after every chunk moved (keep it cheap: a counter).
pub async fn relay<S, R, F>(tcp: TcpStream, mut send: S, mut recv: R, on_bytes: F) -> RelayStats
where
    S: TunnelSend,
    R: TunnelRecv,
    F: Fn(Direction, usize),
{
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    let (mut tcp_r, mut tcp_w) = tcp.split();
    let mut up = 0u64;
    let mut down = 0u64;
    let result = {
        let upstream = copy(
            &mut tcp_r,
            &mut send,
            Direction::TcpToTunnel,
            &mut up,
            &on_bytes,
        );
        let downstream = copy(
            &mut recv,
            &mut tcp_w,
            Direction::TunnelToTcp,
            &mut down,
            &on_bytes,
        );
        tokio::pin!(upstream, downstream);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            if up_done && down_done {
                break Ok(());
            }
            tokio::select! {
                r = &mut upstream, if !up_done => {
                    up_done = true;
                    if let Err(e) = r { break Err(e); }
                }
                r = &mut downstream, if !down_done => {
                    down_done = true;
                    if let Err(e) = r { break Err(e); }
                }
            }
        }
    };
    let outcome = match result {
        Ok(()) => {
            // Stay until the peer has our FIN, so a connection closed right
            // after (agent drain) does not turn it into a reset. Bounded.
            let _ = tokio::time::timeout(DELIVERY_WAIT, send.delivered()).await;
            RelayOutcome::Closed
        }
        Err(Failure::Tcp(e)) => {
            tracing::debug!(error = %e, "TCP side of the relay failed; resetting the stream");
            let c = if is_reset(&e) {
                code::TCP_RESET
            } else {
                code::IO_ERROR
            };
            send.reset(c);
            recv.stop(c);
            RelayOutcome::TcpReset
        }
        Err(Failure::Tunnel(e)) => {
            tracing::debug!(error = %e, "tunnel side of the relay failed; resetting TCP");
            send.reset(code::CANCELLED);
            recv.stop(code::CANCELLED);
            // Linger 0: close() sends an RST instead of a FIN, so the TCP
            // peer sees the reset that happened on the other side.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            RelayOutcome::TunnelReset
        }
    };
    RelayStats {
        outcome,
        tcp_to_tunnel: up,
        tunnel_to_tcp: down,
    }
}

impl Direction {
    /// Blames an error on the side it came from: reads fail on the source
    /// side of this direction, writes on the destination side.
    fn failure(self, reading: bool, e: io::Error) -> Failure {
        match (self, reading) {
            (Direction::TcpToTunnel, true) | (Direction::TunnelToTcp, false) => Failure::Tcp(e),
            _ => Failure::Tunnel(e),
        }
    }
}

async fn copy<Rd, Wr, F>(
    r: &mut Rd,
    w: &mut Wr,
    dir: Direction,
    total: &mut u64,
    on_bytes: &F,
) -> Result<(), Failure>
where
    Rd: AsyncRead + Unpin + ?Sized,
    Wr: AsyncWrite + Unpin + ?Sized,
    F: Fn(Direction, usize),
{
    let read_fail = |e| dir.failure(true, e);
    let write_fail = |e| dir.failure(false, e);
    let mut buf = vec![0u8; MIN_BUF];
    loop {
        let n = r.read(&mut buf).await.map_err(read_fail)?;
        if n == 0 {
            // FIN: pass the half-close on and stop this direction.
            return w.shutdown().await.map_err(write_fail);
        }
        w.write_all(&buf[..n]).await.map_err(write_fail)?;
        *total += n as u64;
        on_bytes(dir, n);
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}
