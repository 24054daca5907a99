//! Fleet load generator: many simulated agents, each with its own
//! certificate, registered to one server from one process.
//!
//! ```text
//! edge-fleet --server ADDR --server-name NAME --ca-dir DIR --agents N
//!            [--endpoints E] [--concurrency C] [--hold-secs S]
//! ```
//!
//! `DIR` holds the CA (`ca.crt`, `ca.key`); every agent gets a certificate
//! for node `fleet-NNNNN` and one address from 100.64.0.0/10 (never used
//! for traffic). Agents speak the real protocol — QUIC with mutual TLS, a
//! control stream, `Hello`, `Welcome` — and keep their connections open
//! with the agent's keep-alive, spread over `E` UDP sockets as NAT would
//! give them distinct source ports. One line `FLEET {json}` on stdout
//! reports how the registration went; the process then holds the fleet for
//! `S` seconds (or until SIGTERM) and closes it.
//!
//! Each simulated agent tries as the agent does: an attempt gives up after
//! 10 s (`--connect-timeout`'s default), and a failed one is tried again
//! after a backoff with full jitter from 1 s, doubling to 30 s, for up to
//! 60 s in all. A QUIC Retry token lives 15 s on the server: a client that
//! kept retransmitting its Initial with one past that (the server had no
//! handshake slot for its source) would be refused, which an agent never
//! sees, as it starts over with a fresh handshake first.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use certs::files::{parse_certs, parse_key, CertDir};
use certs::issue::Ca;
use proto::{Hello, Message};
use transport::quic::QuicSettings;
use transport::{read_message, write_message};

struct Args {
    server: SocketAddr,
    server_name: String,
    ca_dir: PathBuf,
    agents: usize,
    endpoints: usize,
    concurrency: usize,
    hold: Duration,
}

fn parse_args() -> Result<Args> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let num = |name: &str, default: usize, max: usize| -> Result<usize> {
        let n = match flag(name) {
            Some(v) => v
                .parse()
                .with_context(|| format!("{name} {v:?} is not a number"))?,
            None => default,
        };
        if n == 0 || n > max {
            bail!("{name} must be within 1..={max}, got {n}");
        }
        Ok(n)
    };
    Ok(Args {
        server: flag("--server")
            .context("--server ADDR:PORT is required")?
            .parse()
            .context("--server is not an ADDR:PORT")?,
        server_name: flag("--server-name").unwrap_or("localhost").to_owned(),
        ca_dir: flag("--ca-dir").context("--ca-dir is required")?.into(),
        // 100.64.0.0/10 holds 4 M addresses; 100k agents is plenty.
        agents: num("--agents", 1000, 100_000)?,
        endpoints: num("--endpoints", 16, 1024)?,
        concurrency: num("--concurrency", 256, 10_000)?,
        hold: Duration::from_secs(num("--hold-secs", 3600, 86_400)? as u64),
    })
}

/// Agent `i`'s address: 100.64.0.0 + i + 1.
fn address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i as u32 + 1,
    ))
}

fn node(i: usize) -> String {
    format!("fleet-{i:05}")
}

/// Issues every agent's certificate and builds its client configuration.
/// Split over two threads: this is the slow part of starting the fleet.
fn issue_all(args: &Args) -> Result<Vec<quinn::ClientConfig>> {
    let ca_crt = std::fs::read_to_string(args.ca_dir.join("ca.crt")).context("reading ca.crt")?;
    let ca_key = std::fs::read_to_string(args.ca_dir.join("ca.key")).context("reading ca.key")?;
    let ca_der = parse_certs(ca_crt.as_bytes(), &args.ca_dir.join("ca.crt"))?;
    let ca = Ca::from_pem(&ca_crt, &ca_key)?;
    let settings = QuicSettings::default();
    let issue = |i: usize| -> Result<quinn::ClientConfig> {
        let pem = ca.issue_agent(&node(i), &[address(i)], 1)?;
        let dir = CertDir {
            chain: parse_certs(pem.cert.as_bytes(), &PathBuf::from("generated"))?,
            key: parse_key(pem.key.as_bytes(), &PathBuf::from("generated"))?,
            ca: ca_der.clone(),
        };
        let tls = certs::tls::client_config(&dir, proto::ALPN)?;
        Ok(settings.client_config(tls)?)
    };
    let half = args.agents / 2;
    std::thread::scope(|s| {
        let first = s.spawn(|| (0..half).map(issue).collect::<Result<Vec<_>>>());
        let second = (half..args.agents).map(issue).collect::<Result<Vec<_>>>()?;
        let mut all = first.join().expect("issuing thread panicked")?;
        all.extend(second);
        Ok(all)
    })
}

/// One agent's registration: handshake, control stream, Hello, Welcome.
async fn register(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    args: Arc<Args>,
    i: usize,
) -> Result<Agent> {
    let conn = endpoint
        .connect_with(config, args.server, &args.server_name)?
        .await
        .context("QUIC handshake")?;
    let (mut send, mut recv) = conn.open_bi().await.context("control stream")?;
    let hello = Message::Hello(Hello {
        version_major: proto::VERSION_MAJOR,
        version_minor: proto::VERSION_MINOR,
        node: node(i),
        addresses: vec![address(i)],
        capabilities: 0,
        instance: 0,
        previous: String::new(),
    });
    write_message(&mut send, &hello).await?;
    match read_message(&mut recv, &mut Vec::new()).await? {
        Message::Welcome(_) => Ok((conn, send, recv)),
        Message::Refuse(r) => bail!("refused: {}", r.reason),
        other => bail!("expected Welcome, got {}", other.kind()),
    }
}

/// One attempt's bound: the agent's `--connect-timeout` default.
const ATTEMPT: Duration = Duration::from_secs(10);
/// How long an agent keeps trying, in all.
const GIVE_UP: Duration = Duration::from_secs(60);

type Agent = (quinn::Connection, quinn::SendStream, quinn::RecvStream);

/// [`register`] as an agent tries it: bounded attempts, a jittered
/// backoff between them (1 s doubling to 30 s), until [`GIVE_UP`]. Also
/// the error of the first failed attempt, if one was tried again.
async fn register_retrying(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    args: &Arc<Args>,
    i: usize,
) -> (Result<Agent>, Option<String>) {
    let deadline = Instant::now() + GIVE_UP;
    let mut ceiling = Duration::from_secs(1);
    let mut first_failure = None;
    let mut attempt = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(
            ATTEMPT.min(left),
            register(endpoint.clone(), config.clone(), args.clone(), i),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no Welcome within {:?}", ATTEMPT.min(left))));
        let e = match r {
            Ok(agent) => return (Ok(agent), first_failure),
            Err(e) => e,
        };
        let wait = backoff(i, attempt, ceiling);
        if Instant::now() + wait >= deadline {
            return (Err(e), first_failure);
        }
        first_failure.get_or_insert_with(|| format!("{e:#}"));
        tokio::time::sleep(wait).await;
        ceiling = next_ceiling(ceiling);
        attempt += 1;
    }
}

/// The wait of agent `i` before its attempt `attempt + 1`: full jitter
/// under `ceiling`, spread over agents and attempts by multiplying with
/// primes (deterministic, so a run can be repeated; no randomness needed
/// to keep 10,000 agents from retrying in step).
fn backoff(i: usize, attempt: u64, ceiling: Duration) -> Duration {
    let spread = (i as u64)
        .wrapping_mul(7919)
        .wrapping_add(attempt.wrapping_mul(104_729));
    Duration::from_millis(spread % (ceiling.as_millis() as u64 + 1))
}

/// The backoff ceiling after one more failure: doubled, at most 30 s.
fn next_ceiling(ceiling: Duration) -> Duration {
    (ceiling * 2).min(Duration::from_secs(30))
}

#[derive(serde::Serialize)]
struct Report {
    agents: usize,
    registered: usize,
    failed: usize,
    /// Agents that needed more than one attempt (registered or not).
    retried: usize,
    issue_secs: f64,
    register_secs: f64,
    first_error: Option<String>,
    first_retried_error: Option<String>,
}

fn main() -> Result<()> {
    let args = Arc::new(parse_args()?);
    let started = Instant::now();
    let configs = issue_all(&args)?;
    let issue_secs = started.elapsed().as_secs_f64();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let settings = QuicSettings::default();
        let endpoints = (0..args.endpoints)
            .map(|_| settings.client_endpoint("0.0.0.0:0".parse().expect("literal")))
            .collect::<Result<Vec<_>, _>>()?;
        let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, config) in configs.into_iter().enumerate() {
            let permit = limit.clone().acquire_owned().await?;
            let endpoint = endpoints[i % endpoints.len()].clone();
            let args = args.clone();
            tasks.spawn(async move {
                let r = register_retrying(&endpoint, &config, &args, i).await;
                drop(permit);
                r
            });
        }
        let mut held = Vec::with_capacity(args.agents);
        let (mut failed, mut retried) = (0, 0);
        let (mut first_error, mut first_retried_error) = (None, None);
        while let Some(r) = tasks.join_next().await {
            let (outcome, retry_error) = r?;
            if let Some(e) = retry_error {
                retried += 1;
                first_retried_error.get_or_insert(e);
            }
            match outcome {
                Ok(agent) => held.push(agent),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        let report = Report {
            agents: args.agents,
            registered: held.len(),
            failed,
            retried,
            issue_secs,
            register_secs: started.elapsed().as_secs_f64(),
            first_error,
            first_retried_error,
        };
        println!("FLEET {}", serde_json::to_string(&report)?);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::time::sleep(args.hold) => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        for (conn, _, _) in &held {
            conn.close(quinn::VarInt::from_u32(0), b"fleet done");
        }
        // Let the CONNECTION_CLOSE frames leave, within one bound for all.
        let idle = async {
            for endpoint in &endpoints {
                endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), idle).await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_from_one_second_to_thirty() {
        let mut c = Duration::from_secs(1);
        let mut seen = vec![c.as_secs()];
        for _ in 0..7 {
            c = next_ceiling(c);
            seen.push(c.as_secs());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn waits_stay_under_the_ceiling_and_spread_the_fleet() {
        for ceiling in [1, 2, 30].map(Duration::from_secs) {
            let waits: Vec<Duration> = (0..10_000).map(|i| backoff(i, 0, ceiling)).collect();
            assert!(waits.iter().all(|&w| w <= ceiling));
            // Not in step: the first retries of 10,000 agents land in
            // every tenth of the window, none holding more than a fifth.
            let mut tenths = [0usize; 10];
            for w in &waits {
                let t = (w.as_millis() * 10 / (ceiling.as_millis() + 1)) as usize;
                tenths[t] += 1;
            }
            assert!(
                tenths.iter().all(|&n| n > 0 && n < 2_000),
                "{ceiling:?}: {tenths:?}"
            );
        }
        // One agent's successive waits differ too.
        let one: Vec<Duration> = (0..5)
            .map(|a| backoff(17, a, Duration::from_secs(30)))
            .collect();
        assert!(one.windows(2).all(|w| w[0] != w[1]), "{one:?}");
    }

    #[test]
    fn huge_indices_do_not_overflow() {
        let w = backoff(usize::MAX, u64::MAX, Duration::from_secs(30));
        assert!(w <= Duration::from_secs(30));
    }
}
