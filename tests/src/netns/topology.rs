//! cloud / router / edge: building the namespaces, veths and NAT rules,
//! tearing them down, and impairing the link between them.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::{
    sh, Ns, CLOUD_IP, CLOUD_WORKER_SIDE_IP, EDGE_IP, ROUTER_CLOUD_IP, ROUTER_EDGE_IP, WORKER_IP,
};

/// One topology at a time: the tests are CPU-heavy and share port numbers.
static SERIAL: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

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
    /// The edge's veth (extra edge addresses go here).
    pub edge_if: String,
    /// A cloud worker node behind the cloud, once added.
    pub worker: Option<Ns>,
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
            edge_if: format!("et{id}e"),
            worker: None,
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

    /// Drops every forwarded UDP packet at the router (`on`), or stops
    /// doing so: QUIC cannot pass, TCP still can.
    pub fn block_udp(&self, on: bool) {
        let op = if on { "-I" } else { "-D" };
        let mut args = vec!["iptables", op, "FORWARD"];
        if on {
            args.push("1");
        }
        args.extend([
            "-p",
            "udp",
            "-j",
            "DROP",
            "-m",
            "comment",
            "--comment",
            "edge-tunnel-test-no-udp",
        ]);
        self.router.sh(&args);
    }

    /// Undoes [`Self::cut_link`].
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
    /// Adds another address to the edge side (another node behind the NAT).
    pub fn add_edge_ip(&self, ip: &str) {
        self.edge.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &self.edge_if,
        ]);
    }

    /// Adds an address to the router's cloud side: a host on the cloud's
    /// network that is neither the cloud nor behind the NAT (an attacker
    /// on the internet, as the server sees it).
    pub fn add_router_cloud_ip(&self, ip: &str) {
        self.router.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &self.router_ifs[0],
        ]);
    }

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

impl Topology {
    /// Adds a cloud worker node: a namespace behind the cloud
    /// (`WORKER_IP`, its gateway the cloud), reaching the servers'
    /// addresses directly and the edge only as the cloud does (not at all,
    /// through the NAT).
    pub fn add_worker(&mut self) -> &Ns {
        let id = self
            .cloud
            .name
            .strip_prefix("et")
            .and_then(|n| n.strip_suffix("-cloud"))
            .expect("cloud namespace name")
            .to_owned();
        let worker = Ns {
            name: format!("et{id}-worker"),
        };
        sh(&["ip", "netns", "add", &worker.name]);
        worker.sh(&["ip", "link", "set", "lo", "up"]);
        let (c, w) = (format!("et{id}w"), format!("et{id}v"));
        sh(&[
            "ip",
            "link",
            "add",
            &c,
            "netns",
            &self.cloud.name,
            "type",
            "veth",
            "peer",
            "name",
            &w,
            "netns",
            &worker.name,
        ]);
        self.cloud.sh(&[
            "ip",
            "addr",
            "add",
            &format!("{CLOUD_WORKER_SIDE_IP}/24"),
            "dev",
            &c,
        ]);
        self.cloud.sh(&["ip", "link", "set", &c, "up"]);
        self.cloud.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        worker.sh(&["ip", "addr", "add", &format!("{WORKER_IP}/24"), "dev", &w]);
        worker.sh(&["ip", "link", "set", &w, "up"]);
        worker.sh(&["ip", "route", "add", "default", "via", CLOUD_WORKER_SIDE_IP]);
        self.worker = Some(worker);
        self.worker.as_ref().expect("just added")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in [&self.cloud, &self.router, &self.edge]
            .into_iter()
            .chain(self.worker.as_ref())
        {
            let _ = Command::new("ip").args(["netns", "del", &n.name]).status();
            let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&n.name));
        }
    }
}

/// Lets new cloud → edge TCP connections to `ports` (a `lo:hi` range)
/// through the NAT: the direct path benchmarks compare against.
pub fn allow_direct(topo: &Topology, ports: &str) {
    topo.router.sh(&[
        "iptables", "-I", "FORWARD", "1", "-d", EDGE_IP, "-p", "tcp", "--dport", ports, "-j",
        "ACCEPT",
    ]);
}
