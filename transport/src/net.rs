//! Socket helpers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Listen backlog for our TCP listeners. tokio's default of 128 overflows
/// under a burst of a thousand connects (SYN retries after 1 s).
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds a TCP listener with a large backlog and SO_REUSEADDR.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds a UDP socket with the given send and receive buffer sizes
/// (best effort: the kernel caps them at net.core.[rw]mem_max).
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The destination a connection had before iptables DNAT/REDIRECT rewrote
/// it (SO_ORIGINAL_DST, or IP6T_SO_ORIGINAL_DST for IPv6 sockets); `local`
/// is the socket's own address, which the caller has (to tell a connection
/// that was not redirected).
pub fn original_dst(stream: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = if local.is_ipv4() {
        sock.original_dst()?
    } else {
        // A dual-stack socket can carry IPv4 connections as mapped addresses.
        sock.original_dst_ipv6().or_else(|_| sock.original_dst())?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// Maps an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) to plain IPv4, so
/// dual-stack listeners route IPv4 clients by their real address. The same
/// function canonicalizes certificate addresses (`certs::identity`).
pub use certs::identity::canonical_ip;

/// Accepts the next connection. Errors such as EMFILE are logged and
/// retried after a short pause instead of spinning or ending the listener.
pub async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    accept_with(listener, what, |_| {}).await
}

/// [`accept`], telling `on_error` about each failed accept. Consecutive
/// failures back off from 10 ms to 1 s (a process out of descriptors gets
/// no better by retrying at once); the first is logged as a warning, the
/// rest at debug, and recovery is logged.
pub async fn accept_with(
    listener: &TcpListener,
    what: &str,
    on_error: impl Fn(&io::Error),
) -> (TcpStream, SocketAddr) {
    accept_backoff(what, on_error, || listener.accept()).await
}

/// The accept loop of [`accept_with`] for any listener (`accept` is its
/// accept call: TCP, Unix).
pub async fn accept_backoff<T, F, Fut>(
    what: &str,
    on_error: impl Fn(&io::Error),
    mut accept: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    let mut pause = std::time::Duration::from_millis(10);
    let mut failures = 0u64;
    loop {
        match accept().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(failures, "{what} accepts again");
                }
                return v;
            }
            Err(e) => {
                on_error(&e);
                if failures == 0 {
                    tracing::warn!("{what} accept failed: {e}; backing off");
                } else {
                    tracing::debug!(failures, "{what} accept failed: {e}");
                }
                failures += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// A bound on the connections a listener (or a group of listeners) serves
/// at once. Its accept loop takes a slot before each accept, so past the
/// bound it stops accepting: new connections wait in the kernel's listen
/// backlog instead of taking descriptors the process keeps for other
/// work, and nothing is refused that a slot freed a moment later could
/// serve.
#[derive(Debug, Clone)]
pub struct ConnectionSlots {
    sem: Arc<Semaphore>,
    limit: usize,
}

impl ConnectionSlots {
    /// At most `limit` at once; at least 1 (a limit of 0 would never
    /// accept) and at most what a semaphore can count.
    pub fn new(limit: usize) -> ConnectionSlots {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        ConnectionSlots {
            sem: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        self.limit - self.sem.available_permits()
    }

    /// Logs the `hits`-th time `what`'s slots were all taken, at the 1st,
    /// 2nd, 4th, 8th...: a listener kept full does not flood the log.
    /// `flag` is the limit's flag.
    pub fn warn_full(&self, hits: u64, what: &str, flag: &str) {
        if hits.is_power_of_two() {
            tracing::warn!(
                limit = self.limit,
                hits,
                "every {what} slot is taken; new connections wait in the listen backlog ({flag})"
            );
        }
    }

    /// A slot for the next connection, given back when dropped. When none
    /// is free, `on_wait` is called once (to count and log the limit
    /// being hit) and the call waits for one.
    pub async fn acquire(&self, on_wait: impl FnOnce()) -> OwnedSemaphorePermit {
        if let Ok(slot) = self.sem.clone().try_acquire_owned() {
            return slot;
        }
        on_wait();
        self.sem
            .clone()
            .acquire_owned()
            .await
            .expect("a listener's slot semaphore is never closed")
    }
}

/// Connections open per source (an IPv4 address, an IPv6 /64), each at
/// most a limit: one client must not hold every slot of a listener that
/// others need (the probes of an admin port, the helpers of the feed). An
/// entry lives while its count is above zero, so the map is bounded by
/// the listener's own slots. One lock per accepted connection, nothing per
/// byte.
#[derive(Debug, Clone)]
pub struct PerSource {
    limit: usize,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// One connection counted against its source's limit; given back when
/// dropped.
#[derive(Debug)]
pub struct SourceClaim {
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    source: std::net::IpAddr,
}

impl PerSource {
    /// At most `limit` (at least 1) connections per source.
    pub fn new(limit: usize) -> PerSource {
        PerSource {
            limit: limit.max(1),
            open: Arc::default(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts a connection from `peer`, unless its source has `limit` open.
    pub fn claim(&self, peer: std::net::IpAddr) -> Option<SourceClaim> {
        let source = crate::window::client_key(peer);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(source).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(SourceClaim {
            open: self.open.clone(),
            source,
        })
    }
}

impl Drop for SourceClaim {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.source);
            }
        }
    }
}

/// Makes a long-lived TCP connection (the HTTP/2 transport) notice a dead
/// peer about as fast as QUIC's idle timeout does: keep-alive probes every
/// `keepalive`, and TCP_USER_TIMEOUT so unacknowledged data or probes fail
/// the connection after `idle_timeout`. Best effort. On a listener, Linux
/// copies both to every socket it accepts, so a busy listener sets them
/// once instead of five `setsockopt` calls per connection.
pub fn set_liveness<S: std::os::fd::AsFd>(
    socket: &S,
    keepalive: std::time::Duration,
    idle_timeout: std::time::Duration,
) {
    let sock = SockRef::from(socket);
    let params = socket2::TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(keepalive)
        .with_retries(((idle_timeout.as_secs() / keepalive.as_secs().max(1)).max(1)) as u32);
    if let Err(e) = sock.set_tcp_keepalive(&params) {
        tracing::debug!("TCP keep-alive not set: {e}");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(idle_timeout)) {
        tracing::debug!("TCP_USER_TIMEOUT not set: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_counts_and_gives_back() {
        let limits = PerSource::new(2);
        let a: std::net::IpAddr = "198.18.0.1".parse().unwrap();
        let b: std::net::IpAddr = "198.18.0.2".parse().unwrap();
        let first = limits.claim(a).unwrap();
        let _second = limits.claim(a).unwrap();
        assert!(limits.claim(a).is_none(), "a third from one source");
        assert!(limits.claim(b).is_some(), "another source is not held back");
        drop(first);
        assert!(
            limits.claim(a).is_some(),
            "a claim given back frees its place"
        );
        // An IPv6 /64 is one source.
        let v6 = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let _x = limits.claim(v6("fd00::1")).unwrap();
        let _y = limits.claim(v6("fd00::2")).unwrap();
        assert!(limits.claim(v6("fd00::3")).is_none());
        assert!(limits.open.lock().unwrap().len() <= 3);
    }
    use std::time::Duration;

    /// The server sets keep-alive, TCP_USER_TIMEOUT and TCP_NODELAY on
    /// its client listeners only: this is what makes that enough.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_liveness() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        set_liveness(&listener, Duration::from_secs(17), Duration::from_secs(91));
        SockRef::from(&listener).set_nodelay(true).unwrap();
        let dial = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dial, listener.accept());
        let (accepted, _) = accepted.unwrap();
        let sock = SockRef::from(&accepted);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(17));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(17));
        assert_eq!(sock.keepalive_retries().unwrap(), 5);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(91))
        );
        assert!(sock.nodelay().unwrap());
        // The dialing side is untouched.
        let dialed = dialed.unwrap();
        assert!(!SockRef::from(&dialed).keepalive().unwrap());
        assert!(!SockRef::from(&dialed).nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_full_set_of_slots_waits_and_says_so_once() {
        let slots = ConnectionSlots::new(2);
        let waits = std::cell::Cell::new(0);
        let a = slots.acquire(|| waits.set(waits.get() + 1)).await;
        let _b = slots.acquire(|| waits.set(waits.get() + 1)).await;
        assert_eq!((slots.in_use(), waits.get()), (2, 0));
        let third = slots.acquire(|| waits.set(waits.get() + 1));
        tokio::pin!(third);
        assert!(futures_poll_once(third.as_mut()).await.is_none());
        assert_eq!(waits.get(), 1);
        drop(a);
        let _c = third.await;
        assert_eq!((slots.in_use(), waits.get()), (2, 1));
    }

    #[test]
    fn a_limit_of_zero_is_one() {
        let slots = ConnectionSlots::new(0);
        assert_eq!(slots.limit(), 1);
        assert_eq!(
            ConnectionSlots::new(usize::MAX).limit(),
            Semaphore::MAX_PERMITS
        );
    }

    /// Polls `f` once: its output if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
