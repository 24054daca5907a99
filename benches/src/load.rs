//! Load generators (cloud side) and the servers they talk to (edge side).
//! Plain TCP: the same code measures the direct path and the tunnel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Edge-side servers: echo, sink (reads and discards), source (writes forever).
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub echo: u16,
    pub sink: u16,
    pub source: u16,
}

impl Ports {
    /// Echo at `base`, sink at `base + 1`, source at `base + 2`.
    pub const fn from(base: u16) -> Ports {
        Ports {
            echo: base,
            sink: base + 1,
            source: base + 2,
        }
    }
}

fn bind(addr: SocketAddr) -> TcpListener {
    // A 4096 backlog: the fan-out workload connects a thousand at once.
    transport::net::bind_tcp(addr).expect("bind")
}

pub async fn serve(ip: std::net::IpAddr, ports: Ports) {
    e2e::targets::echo_server_on(SocketAddr::new(ip, ports.echo)).await;
    let sink = bind(SocketAddr::new(ip, ports.sink));
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = sink.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let source = bind(SocketAddr::new(ip, ports.source));
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = source.accept().await {
            tokio::spawn(async move {
                let buf = vec![0x5au8; 256 * 1024];
                while tcp.write_all(&buf).await.is_ok() {}
            });
        }
    });
}

/// Bytes per second moved by `streams` connections for `secs`, uploading
/// (to the sink) or downloading (from the source).
pub async fn bulk(addr: SocketAddr, upload: bool, streams: usize, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            let mut buf = vec![0xa5u8; 256 * 1024];
            let mut moved = 0u64;
            while Instant::now() < deadline {
                let n = if upload {
                    tcp.write_all(&buf).await.map(|_| buf.len())
                } else {
                    tcp.read(&mut buf).await
                };
                match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => moved += n as u64,
                }
            }
            moved
        }));
    }
    let start = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Round-trip times of `n` 64-byte ping-pongs on one connection.
pub async fn ping_pong(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    // Warm up.
    for _ in 0..100 {
        tcp.write_all(&msg).await.unwrap();
        tcp.read_exact(&mut back).await.unwrap();
    }
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        tcp.write_all(&msg).await.unwrap();
        tcp.read_exact(&mut back).await.unwrap();
        rtts.push(t.elapsed());
    }
    rtts
}

/// [`ping_pong`] on one connection to each of `addrs` at once, alternating
/// blocks of `block` round trips, so all paths see the same machine state
/// (on a VM, how idle the other vCPU is changes every wake-up's cost).
/// Returns the round-trip times per address, in the order given.
pub async fn ping_pong_interleaved(
    addrs: &[SocketAddr],
    n: usize,
    block: usize,
) -> Vec<Vec<Duration>> {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut conns = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).unwrap();
        for _ in 0..100 {
            tcp.write_all(&msg).await.unwrap();
            tcp.read_exact(&mut back).await.unwrap();
        }
        conns.push((tcp, Vec::with_capacity(n)));
    }
    while conns.iter().any(|(_, out)| out.len() < n) {
        for (tcp, out) in conns.iter_mut() {
            for _ in 0..block.min(n - out.len()) {
                let start = Instant::now();
                tcp.write_all(&msg).await.unwrap();
                tcp.read_exact(&mut back).await.unwrap();
                out.push(start.elapsed());
            }
        }
    }
    conns.into_iter().map(|(_, out)| out).collect()
}

/// Connections per second: connect, one 64-byte request/response, close;
/// `total` of them with `concurrency` in flight. Returns (rate, failures).
pub async fn conn_rate(addr: SocketAddr, total: usize, concurrency: usize) -> (f64, usize) {
    let per_worker = total / concurrency;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            let mut failures = 0;
            for _ in 0..per_worker {
                let ok = async {
                    let mut tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    tcp.write_all(&[1u8; 64]).await?;
                    let mut back = [0u8; 64];
                    tcp.read_exact(&mut back).await?;
                    Ok::<_, std::io::Error>(())
                };
                if tokio::time::timeout(Duration::from_secs(10), ok)
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    failures += 1;
                }
            }
            failures
        }));
    }
    let mut failures = 0;
    for t in tasks {
        failures += t.await.unwrap();
    }
    (
        (per_worker * concurrency) as f64 / start.elapsed().as_secs_f64(),
        failures,
    )
}

/// Time for `conns` concurrent connections to each echo `size` bytes,
/// checksummed. Returns (seconds, failures).
pub async fn fanout(addr: SocketAddr, conns: usize, size: usize) -> (f64, usize) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..conns {
        tasks.push(tokio::spawn(async move {
            let work = async {
                let mut tcp = TcpStream::connect(addr).await?;
                let data: Vec<u8> = (0..size).map(|j| (i * 31 + j * 7) as u8).collect();
                let (mut r, mut w) = tcp.split();
                let write = async {
                    w.write_all(&data).await?;
                    w.shutdown().await
                };
                let read = async {
                    let mut back = Vec::with_capacity(size);
                    r.read_to_end(&mut back).await?;
                    Ok::<_, std::io::Error>(back)
                };
                let (wr, back) = tokio::join!(write, read);
                wr?;
                Ok::<_, std::io::Error>(back? == data)
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(60), work).await,
                Ok(Ok(true))
            )
        }));
    }
    let mut failures = 0;
    for t in tasks {
        if !t.await.unwrap() {
            failures += 1;
        }
    }
    (start.elapsed().as_secs_f64(), failures)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}
