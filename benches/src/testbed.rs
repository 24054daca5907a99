//! The benchmark's testbed on the network-namespace topology: the edge
//! servers (twice: behind the tunnel and on the direct path), the tunnel's
//! real server and agent, and the two reference forwarders; and how a
//! workload reaches each path from `cloud`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::netns::{self, bin, Proc, Topology, CLOUD_IP, EDGE_IP};
use e2e::Pki;

use crate::load::{self, Ports};
use crate::proc_stats::cpu_during;

/// The edge servers the tunnel reaches (DNAT sends these ports through it).
pub const TUNNEL: Ports = Ports::from(7000);
/// The same edge servers on ports the router lets through.
pub const DIRECT: Ports = Ports::from(7100);
/// The reference path: two plain TCP forwarders, entered in `cloud` at
/// these ports, hopping through `FLOOR_HOP` in `edge` to the direct ports.
pub const FLOOR: Ports = Ports::from(7200);
const FLOOR_HOP: Ports = Ports::from(7300);
/// The server's admin endpoint, in `cloud`.
pub const ADMIN: &str = "127.0.0.1:9091";
/// The agent's admin endpoint, in `edge`.
pub const AGENT_ADMIN: &str = "127.0.0.1:9093";
/// The server's CONNECT ingress, in `cloud`.
pub const CONNECT_PORT: u16 = 8080;

/// The load generator's client and the edge servers each run on one
/// thread, pinned to different CPUs: client and target are different hosts
/// in reality, so a round trip between them never gets the shortcut of a
/// same-CPU wake-up, on the direct path or through the tunnel. (Unpinned,
/// the direct ping-pong flips between ~15 µs and ~120 µs with the
/// scheduler's placement.) The tunnel's processes are not pinned.
const CLIENT_CPU: usize = 0;
const EDGE_CPU: usize = 1;

pub struct Testbed {
    pub topo: Topology,
    pub server: Proc,
    pub agent: Proc,
    /// The reference forwarders in `cloud` and in `edge`.
    pub floor: (Proc, Proc),
    _edge_servers: netns::NsTask,
    pub pki: Pki,
    /// Flags every (re)started agent gets besides the standard ones.
    pub agent_extra: Vec<String>,
    /// The other tunnels measured in the same run (those installed).
    pub peers: Vec<crate::peers::Peer>,
    /// Tunneled connections still open after a workload's clients were
    /// done ([`Testbed::settle`]).
    pub leftovers: std::sync::Mutex<Vec<Leftover>>,
}

/// How long the tunnel has to close every tunneled connection once a
/// workload's clients are done: a relay whose both sides sent their FIN
/// ends within 5 s (it waits that long for the peer to acknowledge its
/// own), a reset at once.
const SETTLE: Duration = Duration::from_secs(10);

/// Tunneled connections the server or the agent still counted open
/// [`SETTLE`] after a workload, and the TCP sockets of both namespaces
/// then (listeners, `TIME-WAIT` and the peers' sockets left out).
#[derive(Debug, serde::Serialize)]
pub struct Leftover {
    pub after: String,
    /// `edge_tunnel_streams_active`; `None` if the server did not answer.
    pub server: Option<u64>,
    /// `edge_tunnel_agent_streams_active`; `None` if the agent did not answer.
    pub agent: Option<u64>,
    pub sockets: String,
}

impl Testbed {
    /// Builds the topology, starts everything, and waits until the agent
    /// is registered (its DNAT rule is in place).
    pub fn start() -> Result<Testbed> {
        if !netns::available() {
            bail!("the benchmark needs root and iproute2/iptables/curl (network namespaces)");
        }
        let topo = Topology::new();
        // Every tunnel's client leg gets the same segment size. The tunnel
        // is entered through DNAT: the client's route to the edge address
        // is the link to the router (MTU 1500), so it sends 1448-byte
        // segments even though DNAT then delivers them over loopback. The
        // clients of the peers and of the forwarders dial their listeners
        // in `cloud` directly, over loopback (MTU 65536, 32 KiB segments),
        // which alone made that leg ~30% cheaper (iperf3, benches/RESULTS.md).
        // With `cloud`'s loopback at 1500, every client leg is what a client
        // on another host sees.
        topo.cloud.sh(&["ip", "link", "set", "lo", "mtu", "1500"]);
        // Tens of thousands of connections a minute from one client address
        // to one address and port (the connection rate with `--conns`, the
        // soak) leave more sockets in TIME_WAIT (60 s) than the default
        // ephemeral range (32768-60999) has ports, on the client in `cloud`
        // and on the dialing side in `edge`: connect() then fails at once
        // with EADDRNOTAVAIL, which says nothing about any tunnel. Any host
        // making this many connections needs a wider range.
        for ns in [&topo.cloud, &topo.edge] {
            ns.sh(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65535"]);
            if let Ok(rmem) = std::env::var("BENCH_TCP_RMEM") {
                ns.sh(&["sysctl", "-qw", &format!("net.ipv4.tcp_rmem={rmem}")]);
            }
        }
        netns::allow_direct(&topo, &format!("{}:{}", DIRECT.echo, DIRECT.source));
        netns::allow_direct(&topo, &format!("{}:{}", FLOOR_HOP.echo, FLOOR_HOP.source));
        let pki = Pki::with_server_ips(&[CLOUD_IP.parse()?]);
        let edge_ip: IpAddr = EDGE_IP.parse()?;
        pki.issue_agent("edge-1", &[edge_ip]);
        let edge_servers = topo.edge.spawn_task(move || {
            pin_thread(EDGE_CPU);
            async move {
                load::serve(edge_ip, TUNNEL).await;
                load::serve(edge_ip, DIRECT).await;
                // The naive relay's agent dials loopback.
                load::serve(
                    std::net::Ipv4Addr::LOCALHOST.into(),
                    crate::peers::NAIVE_TARGET,
                )
                .await;
            }
        });
        let server = spawn_server(&topo, &pki, None, &[])?;
        let agent = spawn_agent(&topo, &pki, "quic", &[])?;
        let floor = spawn_floor(&topo)?;
        let peers = crate::peers::start(&topo, &pki);
        let bed = Testbed {
            topo,
            server,
            agent,
            floor,
            _edge_servers: edge_servers,
            pki,
            agent_extra: Vec::new(),
            peers,
            leftovers: Default::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rules =
                String::from_utf8_lossy(&bed.topo.cloud.sh(&["iptables-save", "-t", "nat"]).stdout)
                    .into_owned();
            if rules.contains(&format!("-d {EDGE_IP}/32")) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not register\nserver: {}\nagent: {}",
                    bed.server.log_text(),
                    bed.agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(bed)
    }

    /// Replaces the agent with one on `transport` and waits until the server
    /// routes through it.
    pub fn restart_agent(&mut self, transport: &str) -> Result<()> {
        self.settle("before the agent restarts");
        self.agent.terminate();
        self.agent = spawn_agent(&self.topo, &self.pki, transport, &self.agent_extra)?;
        self.wait_agent(Some(transport))
    }

    /// Replaces the server with one that also gets `extra` flags (and runs
    /// under `prefix`, such as `prlimit --nofile=1024:1024`, if given), and
    /// the agent with a fresh one on QUIC (an agent that lost its server
    /// waits a backoff that grows with each loss; a new one dials at once),
    /// and waits until the agent has registered with it.
    pub fn restart_server(&mut self, prefix: Option<&[&str]>, extra: &[&str]) -> Result<()> {
        self.agent.terminate();
        self.server.terminate();
        self.server = spawn_server(&self.topo, &self.pki, prefix, extra)?;
        self.agent = spawn_agent(&self.topo, &self.pki, "quic", &self.agent_extra)?;
        self.wait_agent(Some("quic"))
    }

    /// Waits until the server lists `edge-1` (on `transport`, if given),
    /// not draining, with its DNAT rule in place.
    pub fn wait_agent(&self, transport: Option<&str>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let want = match transport {
            Some(t) => format!("\"transport\": \"{t}\""),
            None => "\"node\": \"edge-1\"".to_owned(),
        };
        loop {
            let agents = self
                .in_cloud(|| {
                    crate::probe::timed_get(
                        ADMIN.parse().expect("ADMIN"),
                        "/v1/agents",
                        Duration::from_secs(2),
                    )
                })
                .map(|(_, body, _)| body)
                .unwrap_or_default();
            let rules = String::from_utf8_lossy(
                &self.topo.cloud.sh(&["iptables-save", "-t", "nat"]).stdout,
            )
            .into_owned();
            if agents.contains(&want)
                && agents.contains("\"draining\": false")
                && rules.contains(&format!("-d {EDGE_IP}/32"))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {transport:?} did not register\nserver: {}\nagent: {}",
                    self.server.log_text(),
                    self.agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An edge server's address, as a client in `cloud` dials it.
    pub fn addr(port: u16) -> SocketAddr {
        SocketAddr::new(EDGE_IP.parse().unwrap(), port)
    }

    /// Where a client in `cloud` enters the reference forwarders.
    pub fn floor_addr(port: u16) -> SocketAddr {
        SocketAddr::new(CLOUD_IP.parse().expect("CLOUD_IP"), port)
    }

    /// Runs `f` (the workload `what`) against the direct path, then the
    /// tunnel; returns both and the CPU the tunnel processes used during
    /// the tunnel run. Then waits for the tunnel to close what it carried.
    pub fn pair<T: Send>(&self, what: &str, f: impl Fn(Ports) -> T + Sync) -> (T, T, f64, f64) {
        let direct = f(DIRECT);
        let (tunnel, [s, a]) = cpu_during([self.server.pid(), self.agent.pid()], || f(TUNNEL));
        self.settle(&format!("after {what}"));
        (direct, tunnel, s, a)
    }

    /// Waits up to [`SETTLE`] until neither the server nor the agent
    /// counts a tunneled connection open; if one still does, records a
    /// [`Leftover`] (and says so at once): a connection the tunnel never
    /// closed is a leak, whoever's bug it is, and it would hold a drain.
    pub fn settle(&self, after: &str) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let server = self.in_cloud(|| open_streams(ADMIN, "edge_tunnel_streams_active"));
            let agent = self
                .topo
                .edge
                .block_on(|| open_streams(AGENT_ADMIN, "edge_tunnel_agent_streams_active"));
            if server == Some(0) && agent == Some(0) {
                return;
            }
            if Instant::now() > deadline {
                let mut sockets = String::new();
                for (ns, name) in [(&self.topo.cloud, "cloud"), (&self.topo.edge, "edge")] {
                    let out = ns.sh(&["ss", "-tanp"]);
                    sockets.push_str(&format!("{name}:\n"));
                    for line in String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| !l.starts_with("LISTEN") && !l.starts_with("TIME-WAIT"))
                        // The peers' own long-lived connections are noise here.
                        .filter(|l| !l.contains("\"rathole\"") && !l.contains("\"poc-relay\""))
                        .take(40)
                    {
                        sockets.push_str(line);
                        sockets.push('\n');
                    }
                }
                eprintln!(
                    "tunneled connections still open {SETTLE:?} {after}: server {server:?}, \
                     agent {agent:?}\n{sockets}"
                );
                self.leftovers.lock().expect("leftovers").push(Leftover {
                    after: after.to_owned(),
                    server,
                    agent,
                    sockets,
                });
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` against the reference forwarders; returns the result and
    /// the CPU the cloud and edge forwarder used.
    pub fn floor<T>(&self, f: impl Fn(Ports) -> T) -> (T, f64, f64) {
        let (r, [c, e]) = cpu_during([self.floor.0.pid(), self.floor.1.pid()], || f(FLOOR));
        (r, c, e)
    }

    /// Runs `f` against `peer`; returns the result and the CPU its cloud
    /// and edge process used.
    pub fn peer<T>(&self, peer: &crate::peers::Peer, f: impl Fn(Ports) -> T) -> (T, f64, f64) {
        let (r, [c, e]) = cpu_during(peer.pids(), || f(peer.ports));
        (r, c, e)
    }

    /// Runs the load generator's future in `cloud`, on the client's CPU.
    pub fn in_cloud<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: std::future::Future<Output = T>,
        T: Send,
    {
        in_cloud(&self.topo, f)
    }
}

/// The gauge `name` of the admin endpoint at `admin`, in the calling
/// thread's namespace; `None` if it did not answer within 2 s.
async fn open_streams(admin: &str, name: &str) -> Option<u64> {
    let (_, page, _) = crate::probe::timed_get(
        admin.parse().expect("admin address"),
        "/metrics",
        Duration::from_secs(2),
    )
    .await
    .ok()?;
    crate::probe::gauge(&page, name).map(|v| v as u64)
}

/// [`Testbed::in_cloud`] for callers that hold only the topology.
pub fn in_cloud<F, Fut, T>(topo: &Topology, f: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = T>,
    T: Send,
{
    topo.cloud.block_on(|| {
        pin_thread(CLIENT_CPU);
        f()
    })
}

fn pin_thread(cpu: usize) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) <= cpu {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// `--runtime` and `--worker-threads` for `who` ("SERVER" or "AGENT") from
/// `BENCH_{who}_RUNTIME` and `BENCH_{who}_WORKERS`; unset: the defaults.
fn runtime_args(who: &str) -> Vec<String> {
    let mut args = Vec::new();
    if let Ok(shape) = std::env::var(format!("BENCH_{who}_RUNTIME")) {
        args.extend(["--runtime".to_owned(), shape]);
    }
    if let Ok(n) = std::env::var(format!("BENCH_{who}_WORKERS")) {
        args.extend(["--worker-threads".to_owned(), n]);
    }
    args
}

/// The tunnel-server in `cloud`, with DNAT for the tunnel's ports and
/// `extra` flags, run under `prefix` (a command that execs the rest) if
/// given.
fn spawn_server(
    topo: &Topology,
    pki: &Pki,
    prefix: Option<&[&str]>,
    extra: &[&str],
) -> Result<Proc> {
    let server_runtime = runtime_args("SERVER");
    let server = bin("tunnel-server");
    let server = server.to_str().context("path")?;
    let (program, head) = match prefix {
        Some([program, rest @ ..]) => (*program, [rest, &[server]].concat()),
        _ => (server, Vec::new()),
    };
    let connect = format!("{CLOUD_IP}:{CONNECT_PORT}");
    Ok(crate::socket_mem::spawn(
        &topo.cloud,
        program,
        &head
            .into_iter()
            .chain([
                "--listen",
                &format!("{CLOUD_IP}:8443"),
                "--cert-dir",
                pki.server_dir().to_str().context("path")?,
                "--transparent-listen",
                &format!("{CLOUD_IP}:8081"),
                "--connect-listen",
                &connect,
                // The lab's clients carry no proxy token.
                "--connect-allow-unauthenticated",
                "--admin-listen",
                ADMIN,
                "--dnat",
                "--dnat-ports",
                &format!("{},{},{}", TUNNEL.echo, TUNNEL.sink, TUNNEL.source),
            ])
            .chain(server_runtime.iter().map(String::as_str))
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        &topo.dir.join("server.log"),
    ))
}

/// The agent `edge-1` in `edge` on `transport`, with its admin endpoint
/// and `extra` flags.
pub fn spawn_agent(topo: &Topology, pki: &Pki, transport: &str, extra: &[String]) -> Result<Proc> {
    let mut args = vec!["--admin-listen".to_owned(), AGENT_ADMIN.to_owned()];
    args.extend(extra.iter().cloned());
    spawn_agent_as(topo, pki, "edge-1", EDGE_IP, transport, &args)
}

/// An agent for `node` (certificate issued for `ip`) in `edge`, allowing
/// the edge servers' tunnel ports on `ip`.
pub fn spawn_agent_as(
    topo: &Topology,
    pki: &Pki,
    node: &str,
    ip: &str,
    transport: &str,
    extra: &[String],
) -> Result<Proc> {
    let runtime = runtime_args("AGENT");
    let mut args: Vec<&str> = runtime.iter().map(String::as_str).collect();
    args.extend_from_slice(&["--transport", transport]);
    args.extend(extra.iter().map(String::as_str));
    Ok(crate::socket_mem::spawn(
        &topo.edge,
        bin("tunnel-agent").to_str().context("path")?,
        &[
            "--server",
            &format!("{CLOUD_IP}:8443"),
            "--cert-dir",
            pki.agent_dir(node).to_str().context("path")?,
            "--node-name",
            node,
            "--allow",
            &format!("{ip}:{},{},{}", TUNNEL.echo, TUNNEL.sink, TUNNEL.source),
        ]
        .into_iter()
        .chain(args)
        .collect::<Vec<_>>(),
        &topo.dir.join(format!("agent-{node}-{transport}.log")),
    ))
}

/// `LISTEN=TARGET` pairs for one forwarder process.
fn forward_pairs(from_ip: &str, from: Ports, to_ip: &str, to: Ports) -> String {
    [
        (from.echo, to.echo),
        (from.sink, to.sink),
        (from.source, to.source),
    ]
    .iter()
    .map(|(f, t)| format!("{from_ip}:{f}={to_ip}:{t}"))
    .collect::<Vec<_>>()
    .join(",")
}

/// Starts the two reference forwarders (this executable, `--forward`):
/// `cloud` → `edge` → direct ports.
fn spawn_floor(topo: &Topology) -> Result<(Proc, Proc)> {
    let me = std::env::current_exe()?;
    let me = me.to_str().context("path")?;
    let edge = topo.edge.spawn(
        me,
        &[
            "--forward",
            &forward_pairs(EDGE_IP, FLOOR_HOP, EDGE_IP, DIRECT),
        ],
        &topo.dir.join("forwarder-edge.log"),
    );
    let cloud = topo.cloud.spawn(
        me,
        &[
            "--forward",
            &forward_pairs(CLOUD_IP, FLOOR, EDGE_IP, FLOOR_HOP),
        ],
        &topo.dir.join("forwarder-cloud.log"),
    );
    Ok((cloud, edge))
}
