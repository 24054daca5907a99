//! The other tunnels, measured in the same run on the same topology:
//!
//! - **rathole 0.5 with TLS** (`rathole` on `PATH`, or `BENCH_RATHOLE`):
//!   what operators run for this job today, a TCP-over-TLS reverse tunnel
//!   with one TCP connection per forwarded connection. Install it with
//!   `cargo install rathole --version 0.5.0` (without `--locked`: its lock
//!   file pins a `time` that no longer builds).
//! - **the naive quinn relay** (`../shared/reference/naive-relay`, built
//!   with `cargo build --release`; `poc-relay` on `PATH`; or
//!   `BENCH_NAIVE_RELAY`): 460 lines of
//!   quinn with no authentication, registry or limits, run as measured in
//!   the issue (current-thread runtime, 2 MiB / 32 MiB windows): the
//!   ceiling of a QUIC relay on this machine, a measuring stick.
//!
//! Each runs as two processes, one in `cloud` and one in `edge`, entered
//! from `cloud` at its own ports and reaching the same edge servers. A peer
//! that is not installed is skipped with a line saying so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::netns::{Proc, Topology, CLOUD_IP, EDGE_IP};
use e2e::Pki;

use crate::load::Ports;
use crate::testbed::DIRECT;

/// Where a client in `cloud` enters rathole.
pub const RATHOLE: Ports = Ports::from(7600);
/// Where a client in `cloud` enters the naive relay.
pub const NAIVE: Ports = Ports::from(7500);
/// The edge servers the naive relay's agent reaches (it dials loopback).
pub const NAIVE_TARGET: Ports = Ports::from(7400);

/// Label of the rathole rows.
pub const RATHOLE_NAME: &str = "rathole 0.5 TLS (peer)";
/// Label of the naive relay rows.
pub const NAIVE_NAME: &str = "naive quinn relay (reference)";

/// A peer tunnel: its processes in `cloud` and `edge`, and its ports.
pub struct Peer {
    pub name: &'static str,
    pub ports: Ports,
    pub cloud: Proc,
    pub edge: Proc,
}

impl Peer {
    /// Where a client in `cloud` enters it for `port` of [`Ports`].
    pub fn addr(port: u16) -> SocketAddr {
        SocketAddr::new(CLOUD_IP.parse().expect("CLOUD_IP"), port)
    }

    pub fn pids(&self) -> [u32; 2] {
        [self.cloud.pid(), self.edge.pid()]
    }
}

/// Every peer that is installed, started and answering; a line on stderr
/// for each that is not.
pub fn start(topo: &Topology, pki: &Pki) -> Vec<Peer> {
    let mut peers = Vec::new();
    for (name, start) in [
        (
            RATHOLE_NAME,
            rathole as fn(&Topology, &Pki) -> Result<Option<Peer>>,
        ),
        (NAIVE_NAME, naive),
    ] {
        match start(topo, pki) {
            Ok(Some(peer)) => peers.push(peer),
            Ok(None) => eprintln!("skipped {name}: not installed (see benches/src/peers.rs)"),
            Err(e) => eprintln!("skipped {name}: {e:#}"),
        }
    }
    peers
}

fn find(env: &str, candidates: &[PathBuf]) -> Option<PathBuf> {
    if let Ok(path) = std::env::var(env) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    candidates.iter().find(|p| p.is_file()).cloned()
}

fn on_path(name: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        found.push(PathBuf::from(home).join(".cargo/bin").join(name));
    }
    found
}

/// rathole server in `cloud`, client in `edge`, TLS with the testbed's
/// server certificate (as PKCS#12, what rathole's native-tls reads).
fn rathole(topo: &Topology, pki: &Pki) -> Result<Option<Peer>> {
    let Some(bin) = find("BENCH_RATHOLE", &on_path("rathole")) else {
        return Ok(None);
    };
    let bin = bin.to_str().context("path")?.to_owned();
    let dir = topo.dir.join("rathole");
    std::fs::create_dir_all(&dir)?;
    let server_dir = pki.server_dir();
    let pfx = dir.join("identity.pfx");
    let status = std::process::Command::new("openssl")
        .args(["pkcs12", "-export", "-passout", "pass:bench", "-out"])
        .arg(&pfx)
        .arg("-inkey")
        .arg(server_dir.join("tls.key"))
        .arg("-in")
        .arg(server_dir.join("tls.crt"))
        .status()
        .context("openssl (to write rathole's PKCS#12 identity)")?;
    if !status.success() {
        bail!("openssl pkcs12 failed: {status}");
    }
    let token = "edge-tunnel-bench";
    let services = |side: &str, value: &dyn Fn(u16, u16) -> String| {
        [
            ("echo", RATHOLE.echo, DIRECT.echo),
            ("sink", RATHOLE.sink, DIRECT.sink),
            ("source", RATHOLE.source, DIRECT.source),
        ]
        .iter()
        .map(|(name, cloud, edge)| {
            format!(
                "[{side}.services.{name}]\ntoken = \"{token}\"\n{}\n",
                value(*cloud, *edge)
            )
        })
        .collect::<String>()
    };
    let server_toml = format!(
        "[server]\nbind_addr = \"{CLOUD_IP}:2333\"\n\n[server.transport]\ntype = \"tls\"\n\n\
         [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n\n{}",
        pfx.display(),
        services("server", &|cloud, _| format!(
            "bind_addr = \"{CLOUD_IP}:{cloud}\""
        ))
    );
    let client_toml = format!(
        "[client]\nremote_addr = \"{CLOUD_IP}:2333\"\n\n[client.transport]\ntype = \"tls\"\n\n\
         [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n\n{}",
        server_dir.join("ca.crt").display(),
        services("client", &|_, edge| format!(
            "local_addr = \"{EDGE_IP}:{edge}\""
        ))
    );
    let (server_conf, client_conf) = (dir.join("server.toml"), dir.join("client.toml"));
    std::fs::write(&server_conf, server_toml)?;
    std::fs::write(&client_conf, client_toml)?;
    let cloud = crate::socket_mem::spawn(
        &topo.cloud,
        &bin,
        &["--server", server_conf.to_str().context("path")?],
        &topo.dir.join("rathole-server.log"),
    );
    let edge = crate::socket_mem::spawn(
        &topo.edge,
        &bin,
        &["--client", client_conf.to_str().context("path")?],
        &topo.dir.join("rathole-client.log"),
    );
    let peer = Peer {
        name: RATHOLE_NAME,
        ports: RATHOLE,
        cloud,
        edge,
    };
    wait_echo(topo, &peer)?;
    Ok(Some(peer))
}

/// The naive relay's server in `cloud` (it writes a self-signed
/// certificate the agent pins), its agent in `edge`.
fn naive(topo: &Topology, _pki: &Pki) -> Result<Option<Peer>> {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = workspace.join("../shared/reference/naive-relay/target/release/poc-relay");
    let mut candidates = vec![built];
    candidates.extend(on_path("poc-relay"));
    let Some(bin) = find("BENCH_NAIVE_RELAY", &candidates) else {
        return Ok(None);
    };
    let bin = bin.to_str().context("path")?.to_owned();
    let dir = topo.dir.join("naive-relay");
    std::fs::create_dir_all(&dir)?;
    let dir_s = dir.to_str().context("path")?.to_owned();
    let expose: Vec<String> = [
        (NAIVE.echo, NAIVE_TARGET.echo),
        (NAIVE.sink, NAIVE_TARGET.sink),
        (NAIVE.source, NAIVE_TARGET.source),
    ]
    .iter()
    .flat_map(|(cloud, edge)| ["--expose".to_owned(), format!("{CLOUD_IP}:{cloud}={edge}")])
    .collect();
    // As measured in the issue: current-thread runtime, 2 MiB stream and
    // 32 MiB connection windows (its defaults), 64 KiB copy buffers.
    let quic = format!("{CLOUD_IP}:4433");
    let mut args = vec![
        "server",
        "--quic",
        &quic,
        "--cert-out",
        &dir_s,
        "--threads",
        "0",
    ];
    args.extend(expose.iter().map(String::as_str));
    let cloud =
        crate::socket_mem::spawn(&topo.cloud, &bin, &args, &topo.dir.join("naive-server.log"));
    let cert = dir.join("cert.der");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cert.exists() {
        if Instant::now() > deadline {
            bail!("the naive relay's server wrote no certificate");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let edge = crate::socket_mem::spawn(
        &topo.edge,
        &bin,
        &[
            "agent",
            "--server",
            &quic,
            "--cert",
            cert.to_str().context("path")?,
            "--threads",
            "0",
        ],
        &topo.dir.join("naive-agent.log"),
    );
    let peer = Peer {
        name: NAIVE_NAME,
        ports: NAIVE,
        cloud,
        edge,
    };
    wait_echo(topo, &peer)?;
    Ok(Some(peer))
}

/// Waits (30 s at most) until an echo round trip works through `peer`.
fn wait_echo(topo: &Topology, peer: &Peer) -> Result<()> {
    let addr = Peer::addr(peer.ports.echo);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = topo.cloud.block_on(|| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let attempt = async {
                let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
                tcp.write_all(b"ping").await.ok()?;
                let mut buf = [0u8; 4];
                tcp.read_exact(&mut buf).await.ok()?;
                (&buf == b"ping").then_some(())
            };
            tokio::time::timeout(Duration::from_secs(2), attempt)
                .await
                .ok()
                .flatten()
                .is_some()
        });
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no echo through it within 30 s\ncloud: {}\nedge: {}",
                peer.cloud.log_text(),
                peer.edge.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
