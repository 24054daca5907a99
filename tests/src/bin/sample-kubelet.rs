//! A stand-in for a kubelet, for the quickstart and the image smoke test:
//! HTTPS with `/healthz`, `/logs` (a line every 100 ms for 3 s), `/exec`
//! (WebSocket echo) and `/echo` (a POST body back, up to 256 MiB).
//!
//! Usage: sample-kubelet --listen ADDR --cert-dir DIR (tls.crt, tls.key)

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "usage: sample-kubelet --listen ADDR --cert-dir DIR (missing {name})"
                )
            })
    };
    let listen: std::net::SocketAddr = flag("--listen")?.parse()?;
    let dir = PathBuf::from(flag("--cert-dir")?);
    let chain = certs::files::read_certs(&dir.join("tls.crt"))?;
    let key = certs::files::read_key(&dir.join("tls.key"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let l = transport::net::bind_tcp(listen)?;
        eprintln!("sample-kubelet listening on https://{listen}");
        e2e::targets::serve_kubelet_like(l, chain, key).await;
        Ok(())
    })
}
