//! A real NAT built from network namespaces, for the end-to-end tests that
//! need one.
//!
//! ```text
//!  cloud 198.18.0.1 ── 198.18.0.2 router 198.18.1.1 ── 198.18.1.2 edge
//! ```
//!
//! The router masquerades the edge and drops new connections from the
//! cloud towards it, as a home or factory NAT does. The cloud has a route
//! to the edge subnet, so only the NAT stops it. Everything the topology
//! creates (namespaces, veths, rules, processes) is removed on drop, also
//! when a test panics.

use std::fs::File;
use std::future::Future;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

pub const CLOUD_IP: &str = "198.18.0.1";
pub const ROUTER_CLOUD_IP: &str = "198.18.0.2";
pub const ROUTER_EDGE_IP: &str = "198.18.1.1";
pub const EDGE_IP: &str = "198.18.1.2";

/// One topology at a time: the tests are CPU-heavy and share port numbers.
static SERIAL: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether this machine can build namespaces. Under `CI=true` a missing
/// capability or tool fails the test instead of skipping it.
pub fn available() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let mut missing = Vec::new();
    if !root {
        missing.push("root (CAP_NET_ADMIN, CAP_SYS_ADMIN)".to_owned());
    }
    for tool in ["ip", "iptables", "iptables-save", "curl"] {
        if !on_path(tool) {
            missing.push(format!("`{tool}`"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("network-namespace tests need {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: a missing capability is a failure)");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace.
pub struct Ns {
    pub name: String,
}

impl Ns {
    /// `ip netns exec NAME args...`, checked.
    pub fn sh(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A command to run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Starts a process in the namespace; it is killed when the handle drops.
    pub fn spawn(&self, program: &str, args: &[&str], log: &std::path::Path) -> Proc {
        let log_file = File::create(log).unwrap();
        let child = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Proc {
            child: Some(child),
            name: program.to_owned(),
            log: log.to_owned(),
        }
    }

    /// Runs `make()`'s future on a thread that lives in this namespace, so
    /// every socket it opens belongs to the namespace.
    pub fn block_on<F, Fut, T>(&self, make: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(make())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Ns {
    /// Runs `make()`'s future on a thread in this namespace, then keeps
    /// that thread's runtime (and what the future spawned, such as a
    /// server's accept loop) alive until the returned handle is dropped.
    pub fn spawn_task<F, Fut>(&self, make: F) -> NsTask
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let path = format!("/run/netns/{}", self.name);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                make().await;
                let _ = ready_tx.send(());
                let _ = stopped.await;
            });
        });
        ready_rx.recv().expect("task thread started");
        NsTask {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

/// A task running in a namespace's thread; stopped when dropped.
pub struct NsTask {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for NsTask {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A process started in a namespace. Dropping it kills it.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    pub log: std::path::PathBuf,
}

impl Proc {
    /// Sends SIGTERM and waits (bounded) for a clean exit; returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // `ip netns exec` execs the program, so the pid is the program's.
        sh(&["kill", "-TERM", &child.id().to_string()]);
        for _ in 0..300 {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        panic!(
            "{} did not exit within 15s of SIGTERM; log: {}",
            self.name,
            self.log_text()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// cloud / router / edge with the NAT in between.
pub struct Topology {
    pub cloud: Ns,
    pub router: Ns,
    pub edge: Ns,
    pub dir: std::path::PathBuf,
    /// The cloud's veth (extra cloud addresses go here).
    pub cloud_if: String,
    /// The router's veths towards the cloud and towards the edge.
    pub router_ifs: [String; 2],
    _serial: MutexGuard<'static, ()>,
}

impl Topology {
    pub fn new() -> Topology {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns = |role: &str| Ns {
            name: format!("et{id}-{role}"),
        };
        let topo = Topology {
            cloud: ns("cloud"),
            router: ns("router"),
            edge: ns("edge"),
            dir: crate::tempdir(),
            cloud_if: format!("et{id}c"),
            router_ifs: [format!("et{id}r"), format!("et{id}s")],
            _serial: serial,
        };
        for n in [&topo.cloud, &topo.router, &topo.edge] {
            sh(&["ip", "netns", "add", &n.name]);
            n.sh(&["ip", "link", "set", "lo", "up"]);
        }
        // veth names are global until moved: keep them unique and short.
        let (c0, r0, r1, e0) = (
            format!("et{id}c"),
            format!("et{id}r"),
            format!("et{id}s"),
            format!("et{id}e"),
        );
        sh(&[
            "ip",
            "link",
            "add",
            &c0,
            "netns",
            &topo.cloud.name,
            "type",
            "veth",
            "peer",
            "name",
            &r0,
            "netns",
            &topo.router.name,
        ]);
        sh(&[
            "ip",
            "link",
            "add",
            &r1,
            "netns",
            &topo.router.name,
            "type",
            "veth",
            "peer",
            "name",
            &e0,
            "netns",
            &topo.edge.name,
        ]);
        let (cloud, router, edge) = (&topo.cloud, &topo.router, &topo.edge);
        cloud.sh(&["ip", "addr", "add", &format!("{CLOUD_IP}/24"), "dev", &c0]);
        cloud.sh(&["ip", "link", "set", &c0, "up"]);
        cloud.sh(&[
            "ip",
            "route",
            "add",
            "198.18.1.0/24",
            "via",
            ROUTER_CLOUD_IP,
        ]);
        router.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER_CLOUD_IP}/24"),
            "dev",
            &r0,
        ]);
        router.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER_EDGE_IP}/24"),
            "dev",
            &r1,
        ]);
        router.sh(&["ip", "link", "set", &r0, "up"]);
        router.sh(&["ip", "link", "set", &r1, "up"]);
        router.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        router.sh(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "198.18.1.0/24",
            "-o",
            &r0,
            "-j",
            "MASQUERADE",
        ]);
        router.sh(&[
            "iptables",
            "-A",
            "FORWARD",
            "-i",
            &r0,
            "-o",
            &r1,
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ]);
        router.sh(&[
            "iptables", "-A", "FORWARD", "-i", &r0, "-o", &r1, "-j", "DROP",
        ]);
        edge.sh(&["ip", "addr", "add", &format!("{EDGE_IP}/24"), "dev", &e0]);
        edge.sh(&["ip", "link", "set", &e0, "up"]);
        edge.sh(&["ip", "route", "add", "default", "via", ROUTER_EDGE_IP]);
        topo
    }

    /// Drops `probability` of forwarded packets in both directions at the router.
    pub fn set_loss(&self, probability: f64) {
        self.router.sh(&[
            "iptables",
            "-I",
            "FORWARD",
            "1",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &probability.to_string(),
            "-j",
            "DROP",
            "-m",
            "comment",
            "--comment",
            "edge-tunnel-test-loss",
        ]);
    }

    /// Cuts the edge off entirely (both directions) until [`Self::restore_link`].
    pub fn cut_link(&self) {
        self.router.sh(&[
            "iptables",
            "-I",
            "FORWARD",
            "1",
            "-j",
            "DROP",
            "-m",
            "comment",
            "--comment",
            "edge-tunnel-test-cut",
        ]);
    }

    /// Caps both router links at `mbit` Mbit/s (tc tbf) and drops `loss`
    /// of forwarded packets; `None` removes both.
    pub fn shape(&self, shaping: Option<(u32, f64)>) {
        for dev in &self.router_ifs {
            let _ = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.router.name,
                    "tc",
                    "qdisc",
                    "del",
                    "dev",
                    dev,
                    "root",
                ])
                .output();
            if let Some((mbit, _)) = shaping {
                self.router.sh(&[
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{mbit}mbit"),
                    "burst",
                    "64kb",
                    "latency",
                    "200ms",
                ]);
            }
        }
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router.name,
                "iptables",
                "-D",
                "FORWARD",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.01",
                "-j",
                "DROP",
                "-m",
                "comment",
                "--comment",
                "edge-tunnel-test-loss",
            ])
            .output();
        if let Some((_, loss)) = shaping {
            self.set_loss(loss);
        }
    }

    pub fn restore_link(&self) {
        self.router.sh(&[
            "iptables",
            "-D",
            "FORWARD",
            "-j",
            "DROP",
            "-m",
            "comment",
            "--comment",
            "edge-tunnel-test-cut",
        ]);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Topology {
    /// Adds another address to the cloud side (another server replica).
    pub fn add_cloud_ip(&self, ip: &str) {
        self.cloud.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &self.cloud_if,
        ]);
    }
}

impl Ns {
    /// The `/etc/hosts` programs started in this namespace see (`ip netns
    /// exec` bind-mounts `/etc/netns/NAME/hosts` over `/etc/hosts`).
    /// Rewrites in place, so running programs see the change too.
    pub fn set_hosts(&self, lines: &str) {
        let dir = std::path::Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).unwrap();
        let content = format!("127.0.0.1 localhost\n{lines}\n");
        std::fs::write(dir.join("hosts"), content).unwrap();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in [&self.cloud, &self.router, &self.edge] {
            let _ = Command::new("ip").args(["netns", "del", &n.name]).status();
            let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&n.name));
        }
    }
}

/// A workspace binary built in the same profile as the running executable
/// (next to it, or one level up for test executables in `deps/`).
pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let here = exe.parent().expect("exe dir");
    let candidates = [
        here.join(name),
        here.parent().map(|d| d.join(name)).unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built next to {}: run `cargo build --bins` first",
                exe.display()
            )
        })
}

/// Lets new cloud → edge TCP connections to `ports` (a `lo:hi` range)
/// through the NAT: the direct path benchmarks compare against.
pub fn allow_direct(topo: &Topology, ports: &str) {
    topo.router.sh(&[
        "iptables", "-I", "FORWARD", "1", "-d", EDGE_IP, "-p", "tcp", "--dport", ports, "-j",
        "ACCEPT",
    ]);
}
