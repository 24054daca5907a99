//! The floor for any two-process tunnel: two plain TCP forwarders in
//! series (one in `cloud`, one in `edge`), no crypto, no multiplexing, the
//! same one-worker tokio runtime as the tunnel's processes. Measured next to
//! the tunnel, it shows how much of the tunnel's cost is only the two extra
//! user-space hops (each a process wake-up per packet) on this machine.
//!
//! Run as `benches --forward LISTEN=TARGET[,...]` (the runner starts it).

use std::net::SocketAddr;

use anyhow::{Context, Result};

/// For each `LISTEN=TARGET` pair, accepts on LISTEN and relays each
/// connection to TARGET until both sides close.
pub fn run(pairs: &str) -> Result<()> {
    let pairs = pairs
        .split(',')
        .map(|pair| {
            let (listen, target) = pair
                .split_once('=')
                .with_context(|| format!("--forward: {pair:?} is not LISTEN=TARGET"))?;
            let listen: SocketAddr = listen
                .parse()
                .with_context(|| format!("--forward: {listen:?}"))?;
            let target: SocketAddr = target
                .parse()
                .with_context(|| format!("--forward: {target:?}"))?;
            Ok((listen, target))
        })
        .collect::<Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for (listen, target) in pairs {
            let listener =
                transport::net::bind_tcp(listen).with_context(|| format!("bind {listen}"))?;
            tasks.push(tokio::spawn(forward(listener, target)));
        }
        for t in tasks {
            t.await?;
        }
        Ok(())
    })
}

async fn forward(listener: tokio::net::TcpListener, target: SocketAddr) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut inbound,
                &mut outbound,
                64 * 1024,
                64 * 1024,
            )
            .await;
        });
    }
}
