//! A real NAT built from network namespaces, for the end-to-end tests that
//! need one.
//!
//! ```text
//!  cloud 198.18.0.1 ── 198.18.0.2 router 198.18.1.1 ── 198.18.1.2 edge
//!    198.18.2.1
//!      │            (optional: Topology::add_worker)
//!    198.18.2.2 worker
//! ```
//!
//! The router masquerades the edge and drops new connections from the
//! cloud towards it, as a home or factory NAT does. The cloud has a route
//! to the edge subnet, so only the NAT stops it. Everything the topology
//! creates (namespaces, veths, rules, processes) is removed on drop, also
//! when a test panics.
//!
//! - [`topology`]: building the three namespaces and the NAT, and
//!   impairing the link (loss, shaping, cuts, blocked UDP).
//! - [`ns`]: one namespace: commands, processes and async tasks in it.
//! - [`proc`]: a process started in a namespace, and finding the binaries.
//! - [`tunnel`]: the tunnel across the NAT (real server with DNAT in
//!   `cloud`, real agent and a kubelet-like server in `edge`) and the
//!   certificates it uses.
//! - [`probe`]: looking at it from inside a namespace (curl, TCP connects,
//!   waiting on a condition).

pub mod ns;
pub mod probe;
pub mod proc;
pub mod topology;
pub mod tunnel;

use std::process::{Command, Output};

pub use ns::{Ns, NsTask};
pub use proc::{bin, Proc};
pub use topology::{allow_direct, Topology};

pub const CLOUD_IP: &str = "198.18.0.1";
pub const ROUTER_CLOUD_IP: &str = "198.18.0.2";
pub const ROUTER_EDGE_IP: &str = "198.18.1.1";
pub const EDGE_IP: &str = "198.18.1.2";
/// A cloud worker node ([`Topology::add_worker`]): no server runs there,
/// and like every cloud host it cannot reach the edge through the NAT.
pub const WORKER_IP: &str = "198.18.2.2";
/// The cloud's address towards the worker (the worker's gateway).
pub const CLOUD_WORKER_SIDE_IP: &str = "198.18.2.1";

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
    for tool in ["ip", "iptables", "iptables-save", "conntrack", "curl"] {
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

/// Whether every tool (a Debian package of that name) is installed:
/// false, with a SKIPPED line, when one is not; under `CI=true` a missing
/// tool is a failure instead.
pub fn have_tools(tools: &[&str]) -> bool {
    for tool in tools {
        if !on_path(tool) {
            let msg = format!("{tool} is not installed (Debian package {tool})");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
            eprintln!("SKIPPED: {msg}");
            return false;
        }
    }
    true
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
